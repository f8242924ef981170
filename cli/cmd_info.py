"""``sd3plugin-cache info [FINGERPRINT | ARCHIVE]``: full manifest of an entry, an archive or the dir."""
from __future__ import annotations

from pathlib import Path

from .common import add_common, cache_root, emit


def add_parser(sub):
    p = sub.add_parser("info", help="show the manifest of a cache entry, an archive, or the whole cache dir",
                       description="With an archive path: its manifest (only the manifest is read, with "
                                   "the same limits as install; nothing is loaded) and its signature. With a "
                                   "fingerprint (or prefix): that entry. Without: every entry.")
    p.add_argument("target", nargs="?", metavar="FINGERPRINT|ARCHIVE")
    p.add_argument("--files", action="store_true", help="with an archive: list every file too")
    p.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="with an archive: check its signature with this Ed25519 public key (PEM); repeatable; "
                        "adds to $SD3PLUGIN_TRUSTED_KEY (':'-separated key files), never replaces it")
    return add_common(p, overrides=False)


def run(args) -> int:
    from sd3plugin.cache import store
    from sd3plugin.cache.archive import check_compatibility, read_manifest, signature_status
    from sd3plugin.cache.errors import CacheNotFoundError, IncompatibleCacheError

    args.overrides = getattr(args, "overrides", [])
    target = args.target
    path = Path(target).expanduser() if target else None
    if path and ((path.exists() and not path.is_dir()) or target.endswith((".zst", ".tar"))):
        m = read_manifest(path)
        try:
            warnings, compatible = check_compatibility(m), True
        except IncompatibleCacheError as exc:
            warnings, compatible = [str(exc)], False
        files = m.pop("files", {})
        out = {"ok": True, "archive": target, "manifest": m, "files": len(files), "compatible": compatible,
               "warnings": warnings, "signature": signature_status(target, args.trust)}
        if args.files:
            out["file_list"] = files
        emit(args, out, None)
        return 0
    root = cache_root(args)
    entries = store.find_entries(root, target or "")
    if target and not entries:
        raise CacheNotFoundError(f"no entry {target!r} in {str(root)!r} and no such archive file; see "
                                 "`sd3plugin-cache ls`")
    from .cmd_ls import summary

    info = summary(root)
    full = {e["fingerprint"]: e for e in entries}
    info["entries"] = [dict(e, blobs=full[e["fingerprint"]].get("blobs"),
                            composed_config=full[e["fingerprint"]].get("composed_config"))
                       for e in info["entries"] if e["fingerprint"] in full]
    emit(args, {"ok": True, **info}, None)
    return 0
