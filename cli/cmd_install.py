"""``sd3plugin-cache install ARCHIVE [--force] [--expect-sha256 HEX] [--trust PUBKEY]``: verify, then install
atomically."""
from __future__ import annotations

from .common import add_common, cache_root, emit


def add_parser(sub):
    p = sub.add_parser("install", help="verify an archive and install it into the cache dir",
                       description="Checks the archive (its signature with --trust or $SD3PLUGIN_TRUSTED_KEY, "
                                   "its sha256 with --expect-sha256, every file's checksum, member safety, "
                                   "compatibility with this machine) before writing anything, then extracts into "
                                   "a staging folder in the cache dir and moves it into place, all or nothing. "
                                   "An archive is code (pickles and compiled libraries): install only archives "
                                   "you trust.")
    p.add_argument("archive", metavar="ARCHIVE")
    p.add_argument("--force", action="store_true",
                   help="install even if built for another torch/triton/python/GPU (never skips checksums)")
    p.add_argument("--expect-sha256", metavar="HEX", help="refuse unless the archive file has this sha256")
    p.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="refuse unless ARCHIVE.sig is a valid signature by this Ed25519 public key (PEM) or one "
                        "of $SD3PLUGIN_TRUSTED_KEY's (':'-separated key files); repeatable; adds to "
                        "$SD3PLUGIN_TRUSTED_KEY, never replaces it; an empty --trust or a set but empty "
                        "$SD3PLUGIN_TRUSTED_KEY is an error (exit 2), never an unsigned install")
    p.add_argument("--signature", metavar="FILE", help="the signature file (default: ARCHIVE.sig)")
    return add_common(p, lock=True, overrides=True)


def run(args) -> int:
    from sd3plugin.cache.archive import install

    result = install(args.archive, cache_root(args), force=args.force, expect_sha256=args.expect_sha256,
                     lock_timeout=args.lock_timeout, trust=args.trust, signature=args.signature)
    lines = [f"installed {result['files']} files of {result['archive']} into {result['cache_dir']} "
             f"(entries: {', '.join(result['entries']) or 'none'})"]
    if result.get("signed_by"):
        lines.append(f"  signature verified: key {result['signed_by']}")
    lines += [f"  replaced entry {x}" for x in result["replaced_entries"]]
    lines += [f"  kept {x}: warmed here, not in the archive" for x in result.get("kept_blobs", [])]
    lines += [f"  recovered: {x}" for x in result.get("recovered", [])]
    lines += [f"  repaired: {x['file']} ({x['problem']}): {x['action']}" for x in result.get("repaired", [])]
    lines += [f"  warning: {w}" for w in result["warnings"]]
    emit(args, {"ok": True, **result}, "\n".join(lines))
    return 0
