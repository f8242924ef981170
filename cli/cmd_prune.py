"""``sd3plugin-cache prune``: remove cache entries (by fingerprint, incompatible, or older than N days)."""
from __future__ import annotations

import time

from .common import add_common, cache_root, confirm, emit


def add_parser(sub):
    p = sub.add_parser("prune", help="remove selected cache entries (asks, or --yes)",
                       description="Removes whole entries. Inductor/Triton files are shared between entries "
                                   "and content-addressed; `clear` removes them.")
    p.add_argument("--fingerprint", action="append", default=[], metavar="FP",
                   help="remove this entry (a prefix is enough); repeatable")
    p.add_argument("--incompatible", action="store_true",
                   help="remove entries built for another torch/triton/python/GPU")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="remove entries not updated for DAYS days")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return add_common(p, lock=True)


def run(args) -> int:
    from sd3plugin.cache import store
    from sd3plugin.cache.lock import cache_lock
    from sd3plugin.errors import ConfigError

    from .cmd_ls import summary

    if not (args.fingerprint or args.incompatible or args.older_than is not None):
        raise ConfigError("prune needs a selection: --fingerprint FP, --incompatible or --older-than DAYS "
                          "(`clear` removes everything)")
    root = cache_root(args)
    now = time.time()
    chosen = []
    for e in summary(root)["entries"]:
        age_days = (now - _mtime(e["path"])) / 86400
        if (any(e["fingerprint"].startswith(f) for f in args.fingerprint) or
                (args.incompatible and not e["compatible"]) or
                (args.older_than is not None and age_days > args.older_than)):
            chosen.append(e)
    removed, cleaned = [], []
    leftovers = store.leftovers(root) if root.is_dir() else []
    what = ([f"{len(chosen)} cache entr{'y' if len(chosen) == 1 else 'ies'}"] if chosen else []) + (
        [f"{len(leftovers)} leftover(s) of interrupted commands"] if leftovers else [])
    if what and confirm(args, f"remove {' and '.join(what)} from {root}?"):
        with cache_lock(root, args.lock_timeout, "prune") as held:  # taking the lock cleans up leftovers
            cleaned = held.maintenance["recovered"]
            for e in chosen:
                store.remove_tree(store.entry_dir(root, e["fingerprint"]))
                removed.append(e["fingerprint"])
            store.forget_checksums(root, [f"{store.ENTRIES}/{fp}" for fp in removed])
    freed = sum(e["size_bytes"] for e in chosen if e["fingerprint"] in removed)
    freed += sum(x["bytes"] for x in leftovers) if cleaned else 0
    text = (f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} ({store.human_size(freed)}): "
            + (", ".join(removed) or "none") + "".join(f"\n  {x}" for x in cleaned))
    emit(args, {"ok": True, "cache_dir": str(root), "removed": removed, "leftovers_removed": cleaned,
                "freed_bytes": freed}, text)
    return 0


def _mtime(path: str) -> float:
    from pathlib import Path

    p = Path(path) / "entry.json"
    return p.stat().st_mtime if p.exists() else Path(path).stat().st_mtime
