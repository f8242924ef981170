"""``sd3plugin-cache ls``: the cache entries in the cache dir, their shapes, sizes and compatibility."""
from __future__ import annotations

from .common import add_common, cache_root, emit


def add_parser(sub):
    p = sub.add_parser("ls", help="list the caches in the cache dir")
    return add_common(p)


def summary(root) -> dict:
    from sd3plugin.cache import store
    from sd3plugin.cache.manifest import compatibility, environment

    here = environment()
    entries = []
    for e in store.list_entries(root):
        errors, warnings = compatibility(e.get("environment", {}), here, e.get("config", {}).get("device"))
        entries.append({"fingerprint": e.get("fingerprint"), "config": e.get("config"),
                        "shapes": e.get("shapes", []), "size_bytes": e["size_bytes"], "path": e["path"],
                        "created": e.get("created"), "updated": e.get("updated"),
                        "environment": e.get("environment"), "compatible": not errors,
                        "incompatible_because": errors, "warnings": warnings})
    inductor = root / store.INDUCTOR
    leftovers = store.leftovers(root) if root.is_dir() else []
    return {"cache_dir": str(root), "exists": root.is_dir(), "entries": entries,
            "inductor_bytes": store.dir_size(inductor) if inductor.is_dir() else 0,
            "installed": store.read_json(root / store.INSTALLED), "leftovers": leftovers,
            "leftover_bytes": sum(x["bytes"] for x in leftovers)}


def describe(entry: dict) -> str:
    from sd3plugin.cache import store

    c = entry.get("config") or {}
    shapes = ", ".join(f"{s['width']}x{s['height']}/b{s['batch_size']}" for s in entry["shapes"])
    status = "ok" if entry["compatible"] else "INCOMPATIBLE: " + "; ".join(entry["incompatible_because"])
    return (f"{entry['fingerprint']}  {store.human_size(entry['size_bytes']):>9}  model={c.get('model')} "
            f"backend={c.get('backend')} mode={(c.get('mode') or {}).get('spec')!r} device={c.get('device')} "
            f"dtype={c.get('dtype')}  shapes: {shapes}  [{status}]")


def run(args) -> int:
    from sd3plugin.cache import store

    info = summary(cache_root(args))
    lines = [f"{info['cache_dir']}: {len(info['entries'])} entr{'y' if len(info['entries']) == 1 else 'ies'}, "
             f"inductor/Triton files {store.human_size(info['inductor_bytes'])}"]
    lines += ["  " + describe(e) for e in info["entries"]]
    if info["leftovers"]:
        lines.append(f"  leftovers of interrupted commands: {len(info['leftovers'])} "
                     f"({store.human_size(info['leftover_bytes'])}), removed by the next install, warm, prune or "
                     "clear:")
        lines += [f"    {x['path']}  {store.human_size(x['bytes'])}  {x['kind']}" for x in info["leftovers"]]
    if info["installed"]:
        lines.append(f"  installed from {info['installed'].get('archive')} (sha256 "
                     f"{str(info['installed'].get('archive_sha256'))[:16]}...) at {info['installed'].get('installed')}")
    emit(args, {"ok": True, **info}, "\n".join(lines))
    return 0
