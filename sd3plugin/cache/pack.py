"""``pack``: the cache dir as a tar.zst archive whose first member is ``manifest.json`` (every file with its
size and sha256, the environment, the entries), its ``.sha256`` and, with a key, its signature."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

from . import signing, store
from .archive_limits import CHUNK, FORMAT, MANIFEST, MAX_JSON_CONTAINERS, MAX_MANIFEST_BYTES, MAX_WINDOW_LOG
from .archive_manifest import entry_file, json_containers
from .errors import CacheError, CacheNotFoundError, CacheWriteError
from .lock import DEFAULT_TIMEOUT_S, cache_lock
from .manifest import environment


def pack(root: str | Path, output: str | Path, level: int = 10, lock_timeout: float = DEFAULT_TIMEOUT_S,
         sign_key: str | Path | None = None) -> dict:
    """Write the cache in ``root`` to ``output`` (tar.zst); return the manifest plus the archive's sha256.

    With ``sign_key`` (an Ed25519 private key, PEM) also write the detached signature ``output.sig``.
    """
    from ..errors import ConfigError

    root, output = Path(root).expanduser(), Path(output).expanduser()
    if not 1 <= int(level) <= 22:
        raise ConfigError(f"--level {level} must be between 1 and 22")
    key = signing.load_private_key(sign_key) if sign_key else None
    if not store.has_cache(root):
        raise CacheNotFoundError(f"no compile cache in {str(root)!r}; run `sd3plugin-cache warm` first "
                                 "(or give --cache-dir)")
    with cache_lock(root, lock_timeout, "pack"):
        listed = {e.get("fingerprint") for e in store.list_entries(root)}
        try:
            files = {rel: _file_digest(path) for rel, path in _packable(root, listed)}
        except OSError as exc:
            raise CacheError(f"cannot read the cache dir {str(root)!r}: {exc.strerror} ({exc.filename})") from None
        if not files:
            raise CacheNotFoundError(f"the compile cache in {str(root)!r} is empty; run `sd3plugin-cache "
                                     "warm` first")
        manifest = build_manifest(root, files)
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        if len(manifest_bytes) > MAX_MANIFEST_BYTES or json_containers(manifest_bytes) > MAX_JSON_CONTAINERS:
            raise CacheError(f"the manifest of {len(files)} files would be {len(manifest_bytes)} bytes, over "
                             f"the {MAX_MANIFEST_BYTES} bytes that install accepts; prune entries (or clear "
                             "and warm only what you serve) and pack again")
        size, digest = _write_archive(root, output, files, manifest_bytes, level, listed)
    try:
        store.atomic_write(output.with_name(output.name + ".sha256"), f"{digest}  {output.name}\n".encode())
    except OSError as exc:
        raise CacheWriteError(f"cannot write {str(output)}.sha256: {exc.strerror}") from None
    result = {"archive": str(output), "archive_sha256": digest, "archive_bytes": size, "manifest": manifest}
    if key is not None:
        result["signature"] = str(signing.write_signature(output, key, digest))
        result["key_id"] = signing.key_id(key.public_key())
    return result


def _packable(root: Path, listed: set):
    """Every packable file; files of an entry folder without a readable entry.json are left out."""
    for rel, path in store.iter_files(root):
        parts = rel.split("/")
        if parts[0] == store.ENTRIES and (not entry_file(parts) or parts[1] not in listed):
            continue
        yield rel, path


def _write_archive(root: Path, output: Path, files: dict, manifest_bytes: bytes, level: int, listed: set
                   ) -> tuple[int, str]:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as exc:
        raise CacheWriteError(f"cannot write {str(output)!r}: {exc.strerror}") from None
    raw = None
    try:
        store.default_mode(tmp)
        raw = os.fdopen(fd, "wb")
        hashing = _HashingWriter(raw)
        window = min(zstandard.ZstdCompressionParameters.from_level(level).window_log, MAX_WINDOW_LOG)
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window, threads=-1)
        zw = zstandard.ZstdCompressor(compression_params=params).stream_writer(hashing, closefd=False)
        tar = tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT)
        _add_bytes(tar, MANIFEST, manifest_bytes)
        for rel, path in _packable(root, listed):
            if rel in files:
                _add_file(tar, rel, path, files[rel])
        tar.close()
        zw.close()
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        raw = None
        os.replace(tmp, output)
    except (OSError, zstandard.ZstdError) as exc:
        _discard(raw, tmp)
        raise CacheWriteError(f"cannot write {str(output)!r}: {why(exc)}; free some space or choose another "
                              "-o (nothing was written)") from None
    except BaseException:
        _discard(raw, tmp)
        raise
    return hashing.size, hashing.sha256.hexdigest()


def _discard(raw, tmp) -> None:
    if raw is not None:
        try:
            raw.close()
        except OSError:
            pass
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


def why(exc) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def build_manifest(root: Path, files: dict) -> dict:
    entries = []
    for e in store.list_entries(root):
        entries.append({k: e.get(k) for k in ("fingerprint", "config", "composed_config", "shapes",
                                               "environment", "blobs", "created", "updated")})
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "environment": environment(), "entries": entries, "files": files,
                "total_bytes": sum(f["size"] for f in files.values())}
    if len(entries) == 1:  # the common case: one config per archive
        manifest["fingerprint"] = entries[0]["fingerprint"]
        manifest["config"] = entries[0].get("composed_config") or entries[0]["config"]
        manifest["shapes"] = entries[0]["shapes"]
    return manifest


def _file_digest(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, rel: str, path: Path, expected: dict) -> None:
    changed = CacheWriteError(f"{rel} changed while packing (is a process writing to the cache?); run pack again")
    try:
        data = path.read_bytes()
        executable = os.access(path, os.X_OK)
    except OSError:
        raise changed from None
    if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise changed
    info = tarfile.TarInfo(rel)
    info.size, info.mode, info.mtime = len(data), 0o755 if executable else 0o644, 0
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return n

    def flush(self):
        self.raw.flush()
