"""``sd3plugin-cache pack -o ARCHIVE [--sign KEY]``: one zstd-compressed archive with a manifest."""
from __future__ import annotations

from .common import add_common, cache_root, emit


def add_parser(sub):
    p = sub.add_parser("pack", help="pack the cache dir into one archive (tar + zstandard, with manifest)")
    p.add_argument("-o", "--output", required=True, metavar="ARCHIVE", help="archive to write (.tar.zst)")
    p.add_argument("--level", type=int, default=10, help="zstandard level 1-22 (default 10)")
    p.add_argument("--sign", metavar="KEY",
                   help="also write ARCHIVE.sig, a detached signature by this Ed25519 private key (PEM; "
                        "`sd3plugin-cache keygen` makes one)")
    return add_common(p, lock=True)


def check_has_entries(root) -> None:
    """A cache dir with compiled files but no cache entry (what ``sd3plugin-run`` leaves) packs into an archive
    that ``ls`` shows and ``verify`` cannot use: refused (exit 6) with the fix."""
    from sd3plugin.cache import store
    from sd3plugin.cache.errors import CacheNotFoundError

    if store.has_cache(root) and not store.list_entries(root):
        raise CacheNotFoundError(f"the cache dir {str(root)!r} has no cache entries (only compiled files, which "
                                 "an installed archive cannot be verified or served from); run `sd3plugin-cache "
                                 "warm [OVERRIDES]` first, then pack")


def run(args) -> int:
    from sd3plugin.cache import store
    from sd3plugin.cache.archive import pack

    root = cache_root(args)
    check_has_entries(root)
    result = pack(root, args.output, level=args.level, lock_timeout=args.lock_timeout,
                  sign_key=args.sign)
    m = result["manifest"]
    text = (f"packed {len(m['files'])} files ({store.human_size(m['total_bytes'])}) of "
            f"{len(m['entries'])} entr{'y' if len(m['entries']) == 1 else 'ies'} into {result['archive']} "
            f"({store.human_size(result['archive_bytes'])})\nsha256 {result['archive_sha256']}\n")
    if result.get("signature"):
        text += (f"signed with key {result['key_id']}: {result['signature']}\n"
                 f"install with: sd3plugin-cache install {result['archive']} --trust KEY.pub")
    else:
        text += (f"install with: sd3plugin-cache install {result['archive']} --expect-sha256 "
                 f"{result['archive_sha256']}")
    if args.json:
        result = {**result, "manifest": {k: v for k, v in m.items() if k != "files"}, "files": len(m["files"])}
    emit(args, {"ok": True, **result}, text)
    return 0
