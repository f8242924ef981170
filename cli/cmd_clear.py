"""``sd3plugin-cache clear``: remove every compile cache of the cache dir (asks, or --yes)."""
from __future__ import annotations

from .common import add_common, cache_root, confirm, emit


def add_parser(sub):
    p = sub.add_parser("clear", help="remove all compile caches of the cache dir (asks, or --yes)",
                       description="Removes entries/, inductor/ (with Triton's cache) and installed.json. "
                                   "Random-weight models under models/ stay unless --models.")
    p.add_argument("--models", action="store_true", help="also remove the random-weight models")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return add_common(p, lock=True)


def run(args) -> int:
    from sd3plugin.cache import store
    from sd3plugin.cache.lock import cache_lock

    root = cache_root(args)
    names = list(store.PACKED_DIRS) + [store.INSTALLED] + (["models"] if args.models else [])
    present = [n for n in names if (root / n).exists()]
    removed, freed = [], 0
    if present and confirm(args, f"remove {', '.join(present)} from {root}?"):
        with cache_lock(root, args.lock_timeout, "clear"):
            for n in present:
                path = root / n
                freed += store.dir_size(path) if path.is_dir() else path.stat().st_size
                store.remove_tree(path)
                removed.append(n)
    text = f"cleared {root}: removed {', '.join(removed) or 'nothing'} ({store.human_size(freed)})"
    emit(args, {"ok": True, "cache_dir": str(root), "removed": removed, "freed_bytes": freed}, text)
    return 0
