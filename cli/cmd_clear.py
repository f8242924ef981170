"""``sd3plugin-cache clear``: remove every compile cache of the cache dir (asks, or --yes)."""
from __future__ import annotations

import os
from pathlib import Path

from .common import add_common, cache_root, confirm, emit


def add_parser(sub):
    p = sub.add_parser("clear", help="remove all compile caches of the cache dir (asks, or --yes)",
                       description="Removes entries/, inductor/ (with Triton's cache), installed.json, "
                                   "checksums.json and what interrupted commands left (.install-* folders, "
                                   "temporary files). Random-weight models under models/ stay unless --models.")
    p.add_argument("--models", action="store_true", help="also remove the random-weight models")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return add_common(p, lock=True)


def run(args) -> int:
    from sd3plugin.cache import store
    from sd3plugin.cache.lock import cache_lock

    root = cache_root(args)
    names = list(store.PACKED_DIRS) + [store.INSTALLED, store.CHECKSUMS] + (["models"] if args.models else [])
    present = [n for n in names if os.path.lexists(root / n)]
    leftovers = store.leftovers(root) if root.is_dir() else []
    removed, freed = [], 0
    what = present + ([f"{len(leftovers)} leftover(s) of interrupted commands"] if leftovers else [])
    if what and confirm(args, f"remove {', '.join(what)} from {root}?"):
        with cache_lock(root, args.lock_timeout, "clear", maintain=False):
            for item in store.leftovers(root):  # what interrupted commands left: nothing to roll back into
                freed += item["bytes"]
                store.remove_tree(Path(item["path"]))
                removed.append(os.path.relpath(item["path"], root))
            for n in present:
                path = root / n
                if not os.path.lexists(path):
                    continue
                freed += store.dir_size(path) if path.is_dir() and not path.is_symlink() else path.lstat().st_size
                store.remove_tree(path)
                removed.append(n)
    text = f"cleared {root}: removed {', '.join(removed) or 'nothing'} ({store.human_size(freed)})"
    emit(args, {"ok": True, "cache_dir": str(root), "removed": removed, "freed_bytes": freed}, text)
    return 0
