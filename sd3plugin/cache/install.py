"""``install``: verify an archive completely, then install it into the cache dir, all or nothing.

The archive is opened once: with a trusted key or ``--expect-sha256`` its bytes are hashed and the
signature / pin checked first; pass 1 reads the stream without writing anything (checksums, member
safety, completeness); compatibility and free space are checked; then, under the cache dir's lock,
pass 2 reads it again into a staging folder inside the cache dir and ``install_commit.commit`` moves
it into place under a journal.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from . import archive_scan, signing, store
from .archive_manifest import HEX64
from .errors import CacheWriteError, CorruptArchiveError, IncompatibleCacheError
from .install_commit import commit
from .lock import DEFAULT_TIMEOUT_S, cache_lock
from .manifest import compatibility, environment
from .pack import why
from .tar_reader import Source


def check_compatibility(manifest: dict, force: bool = False) -> list[str]:
    """Warnings; raises IncompatibleCacheError naming every difference unless ``force``."""
    here = environment()
    errors, warnings = [], []
    entries = manifest.get("entries") or [{"config": {}, "environment": manifest.get("environment", {})}]
    for e in entries:
        err, warn = compatibility(e.get("environment") or manifest.get("environment", {}), here,
                                  (e.get("config") or {}).get("device"))
        errors += [x for x in err if x not in errors]
        warnings += [x for x in warn if x not in warnings]
    if errors and not force:
        raise IncompatibleCacheError("the archive was built for another environment: " + "; ".join(errors)
                                     + ". Its compiled artefacts would not load here; warm a cache on this "
                                       "machine type, or pass --force to install it anyway")
    if errors:
        warnings = [f"forced: {x}" for x in errors] + warnings
    return warnings


def install(archive: str | Path, root: str | Path, force: bool = False, expect_sha256: str | None = None,
            lock_timeout: float = DEFAULT_TIMEOUT_S, trust: list[str] | None = None,
            signature: str | Path | None = None) -> dict:
    """Verify ``archive`` completely, then install it into the cache dir ``root`` (all or nothing).

    ``trust``: public-key files (default: ``$SD3PLUGIN_TRUSTED_KEY``); with any, the archive must carry
    a valid signature (``signature``, default ``ARCHIVE.sig``) by one of them.
    """
    from ..errors import ConfigError

    archive, root = Path(archive).expanduser(), Path(root).expanduser().absolute()
    keys = signing.trusted_keys(trust)
    if expect_sha256 is not None:
        expect_sha256 = expect_sha256.strip().lower()
        if not HEX64.fullmatch(expect_sha256):
            raise ConfigError(f"--expect-sha256 {expect_sha256!r} is not a sha256 (64 hex digits)")
    with Source(archive) as src:
        pinned, key_id = None, None
        if keys or expect_sha256:  # the raw bytes only: nothing of the archive is parsed before this
            pinned = src.hash_all()
            if expect_sha256 and pinned != expect_sha256:
                raise CorruptArchiveError(f"{archive}: sha256 is {pinned}, expected {expect_sha256}; this is not "
                                          "the archive you pinned; refusing to install")
            if keys:
                sig = Path(signature).expanduser() if signature else Path(str(archive) + signing.SUFFIX)
                key_id = signing.check(archive, sig, pinned, keys)
        manifest, digest = archive_scan.scan_source(src, archive)  # pass 1: nothing is written
        if pinned is not None and digest != pinned:
            raise CorruptArchiveError(f"{archive}: the archive changed while it was being read; refusing it")
        warnings = check_compatibility(manifest, force)
        if root.exists() and not root.is_dir():
            raise CacheWriteError(f"--cache-dir {str(root)!r} exists and is not a folder")
        _check_free_space(root, manifest)
        created = not root.exists()
        try:
            result = _install_locked(src, archive, root, manifest, digest, force, warnings, key_id, lock_timeout)
        except BaseException:
            if created:  # a failed install into a new cache dir leaves no cache dir behind
                _remove_if_only_lock(root)
            raise
    return result


def _remove_if_only_lock(root: Path) -> None:
    from .lock import LOCK_NAME

    try:
        if {p.name for p in root.iterdir()} <= {LOCK_NAME}:
            (root / LOCK_NAME).unlink(missing_ok=True)
            root.rmdir()
    except OSError:
        pass


def _install_locked(src, archive, root, manifest, digest, force, warnings, key_id, lock_timeout) -> dict:
    """Pass 2 and the commit, under the cache dir's lock."""
    with cache_lock(root, lock_timeout, "install into") as held:
        try:
            staging = Path(tempfile.mkdtemp(prefix=store.INSTALL_PREFIX, dir=root))
        except OSError as exc:
            raise write_error(root, exc) from None
        try:
            try:
                # pass 2: every byte again
                _, digest2 = archive_scan.scan_source(src, archive, extract_to=staging / "new")
            except OSError as exc:
                raise write_error(root, exc) from None
            if digest2 != digest:
                raise CorruptArchiveError(f"{archive}: the archive changed while it was being installed; "
                                          "refusing it (the cache is as it was)")
            record = {"archive": str(archive), "archive_sha256": digest, "installed": store._now(),
                      "forced": bool(force and warnings), "signed_by": key_id,
                      "manifest": {k: v for k, v in manifest.items() if k != "files"},
                      "files": len(manifest["files"])}
            try:
                replaced, kept = commit(staging, root, manifest, record)
            except OSError as exc:
                raise write_error(root, exc) from None
        finally:
            journal = store.read_json(staging / store.JOURNAL)
            if not journal or journal.get("state") != "moving":  # else: left for recovery
                shutil.rmtree(staging, ignore_errors=True)
    return {"archive": str(archive), "archive_sha256": digest, "cache_dir": str(root), "warnings": warnings,
        "replaced_entries": replaced, "kept_blobs": kept, "files": len(manifest["files"]),
        "entries": [e.get("fingerprint") for e in manifest.get("entries", [])],
        "total_bytes": manifest.get("total_bytes"), "signed_by": key_id,
        "recovered": held.maintenance["recovered"], "repaired": held.maintenance["repaired"]}


def write_error(root: Path, exc: OSError) -> CacheWriteError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = "free some space or choose another --cache-dir" if full else "check its permissions or choose another --cache-dir"
    return CacheWriteError(f"cannot write into {str(root)!r}: {why(exc)}; {hint} (the cache is as it was)")


def _check_free_space(root: Path, manifest: dict) -> None:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    need = manifest["total_bytes"]
    if need > free:
        raise CacheWriteError(f"cannot install into {str(root)!r}: the archive unpacks to {need} bytes and "
                              f"{free} are free; free some space or choose another --cache-dir (nothing was written)")
