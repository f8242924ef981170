"""Cache archives: a zstandard-compressed tar stream whose first member is ``manifest.json``.

The manifest lists every file with its size and sha256, the environment it was built on and the
entries (config, fingerprint, shapes). ``install`` checks the archive's own sha256 (optional), reads
the whole stream once without writing anything (checksums, member safety, completeness), checks
compatibility, then extracts again into a temporary folder inside the target and moves the content
into place: each entry by one rename, inductor files one by one (they are content-addressed).

An archive is code: its Mega-Cache blobs and inductor entries are pickles and compiled libraries that
torch loads and runs. Install archives only from sources you trust; pin them with ``--expect-sha256``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import zstandard

from . import store
from .errors import CacheNotFoundError, CacheWriteError, CorruptArchiveError, IncompatibleCacheError
from .lock import DEFAULT_TIMEOUT_S, cache_lock
from .manifest import compatibility, environment

FORMAT = "sd3plugin-cache/1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
CHUNK = 1 << 20


# -- pack -------------------------------------------------------------------------------------------
def pack(root: str | Path, output: str | Path, level: int = 10, lock_timeout: float = DEFAULT_TIMEOUT_S
         ) -> dict:
    """Write the cache in ``root`` to ``output`` (tar.zst); return the manifest plus the archive's sha256."""
    root, output = Path(root).expanduser(), Path(output).expanduser()
    if not store.has_cache(root):
        raise CacheNotFoundError(f"no compile cache in {str(root)!r}; run `sd3plugin-cache warm` first "
                                 "(or give --cache-dir)")
    with cache_lock(root, lock_timeout, "pack"):
        files = {rel: _file_digest(path) for rel, path in store.iter_files(root)}
        if not files:
            raise CacheNotFoundError(f"the compile cache in {str(root)!r} is empty; run `sd3plugin-cache "
                                     "warm` first")
        manifest = build_manifest(root, files)
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
            store.default_mode(tmp)
        except OSError as exc:
            raise CacheWriteError(f"cannot write {str(output)!r}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as raw:
                hashing = _HashingWriter(raw)
                cctx = zstandard.ZstdCompressor(level=level, threads=-1)
                with cctx.stream_writer(hashing, closefd=False) as zw:
                    with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                        _add_bytes(tar, MANIFEST, manifest_bytes)
                        for rel, path in store.iter_files(root):
                            if rel in files:
                                _add_file(tar, rel, path, files[rel])
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    digest = hashing.sha256.hexdigest()
    store.atomic_write(output.with_name(output.name + ".sha256"), f"{digest}  {output.name}\n".encode())
    return {"archive": str(output), "archive_sha256": digest, "archive_bytes": hashing.size,
            "manifest": manifest}


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
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, rel: str, path: Path, expected: dict) -> None:
    data = path.read_bytes()
    if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CacheWriteError(f"{rel} changed while packing (is a process writing to the cache?); run "
                              "pack again")
    import io

    info = tarfile.TarInfo(rel)
    info.size, info.mode, info.mtime = len(data), 0o755 if os.access(path, os.X_OK) else 0o644, 0
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


# -- read / verify ----------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    return _file_digest(Path(path))["sha256"]


def check_member_name(name: str) -> str:
    """The member's safe relative path, or CorruptArchiveError for absolute paths, ``..`` and strays."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise CorruptArchiveError(f"unsafe archive member {name!r}: absolute path; refusing to install")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".", "") for p in parts) or ".." in name.split("/"):
        raise CorruptArchiveError(f"unsafe archive member {name!r}: '..' or '.' in the path; refusing to "
                                  "install")
    if parts[0] not in store.PACKED_DIRS:
        raise CorruptArchiveError(f"unsafe archive member {name!r}: outside {'/, '.join(store.PACKED_DIRS)}/, "
                                  "the only folders of a cache archive; refusing to install")
    return "/".join(parts)


def _check_member_type(m: tarfile.TarInfo) -> None:
    if m.isreg() or m.isdir():
        return
    kind = ("symbolic link" if m.issym() else "hard link" if m.islnk() else "device" if m.isdev()
            else "fifo" if m.isfifo() else f"type {m.type!r}")
    target = f" -> {m.linkname}" if m.issym() or m.islnk() else ""
    raise CorruptArchiveError(f"unsafe archive member {m.name!r}{target}: a {kind}; cache archives hold "
                              "only regular files and folders; refusing to install")


def read_manifest(path: str | Path) -> dict:
    """The manifest of an archive (reads only the first member; loads nothing)."""
    with _open_stream(Path(path)) as (tar, _):
        return _first_manifest(tar, _members(tar, Path(path)), Path(path))


def scan(path: str | Path, extract_to: Path | None = None) -> dict:
    """Read the whole archive, checking every member against the manifest; optionally extract.

    Raises CorruptArchiveError on any mismatch, unsafe member, truncation or missing file.
    """
    path = Path(path)
    with _open_stream(path) as (tar, _):
        members = _members(tar, path)
        manifest = _first_manifest(tar, members, path)
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CorruptArchiveError(f"{path}: manifest has no file list; not an sd3plugin cache archive")
        for name in files:
            check_member_name(name)
        seen: set[str] = set()
        folders: set[str] = set()
        for m in members:
            rel = check_member_name(m.name)
            _check_member_type(m)
            parents = {"/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)}
            if parents & seen or (m.isreg() and rel in folders):
                raise CorruptArchiveError(f"{path}: member {rel!r} is both a file and a folder; the archive was "
                                          "altered")
            folders |= parents | ({rel} if m.isdir() else set())
            if m.isdir():
                if extract_to is not None:
                    (extract_to / rel).mkdir(parents=True, exist_ok=True)
                continue
            if rel not in files:
                raise CorruptArchiveError(f"{path}: member {rel!r} is not in the manifest; the archive was "
                                          "altered")
            if rel in seen:
                raise CorruptArchiveError(f"{path}: member {rel!r} appears twice; the archive was altered")
            seen.add(rel)
            _check_file(tar, m, rel, files[rel], path, extract_to)
        missing = sorted(set(files) - seen)
        if missing:
            raise CorruptArchiveError(f"{path}: {len(missing)} file(s) of the manifest are missing (first: "
                                      f"{missing[0]!r}); the archive is truncated or incomplete")
    return manifest


def _check_file(tar, m, rel, expected, path, extract_to):
    src = tar.extractfile(m)
    h, size, out = hashlib.sha256(), 0, None
    if extract_to is not None:
        dest = extract_to / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o755 if m.mode & 0o100 else 0o644)
        out = os.fdopen(fd, "wb")
    try:
        while chunk := _read(src, path):
            h.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if size != expected.get("size") or h.hexdigest() != expected.get("sha256"):
        raise CorruptArchiveError(f"{path}: checksum mismatch for {rel!r} (manifest sha256 "
                                  f"{str(expected.get('sha256'))[:16]}..., archive {h.hexdigest()[:16]}...); "
                                  "the archive was altered or damaged; get a fresh copy")


def _read(src, path):
    try:
        return src.read(CHUNK)
    except (zstandard.ZstdError, tarfile.TarError, EOFError, OSError) as exc:
        raise _truncated(path, exc) from None


def _members(tar, path):
    it = iter(tar)
    while True:
        try:
            m = next(it)
        except StopIteration:
            return
        except (zstandard.ZstdError, tarfile.TarError, EOFError, OSError) as exc:
            raise _truncated(path, exc) from None
        yield m


def _first_manifest(tar, members, path: Path) -> dict:
    first = next(members, None)
    if first is None or first.name != MANIFEST or not first.isreg() or first.size > MAX_MANIFEST_BYTES:
        raise CorruptArchiveError(f"{path}: the first member is not {MANIFEST}; not an sd3plugin cache archive "
                                  "(make one with `sd3plugin-cache pack`)")
    src = tar.extractfile(first)
    data = b"".join(iter(lambda: _read(src, path), b""))
    try:
        manifest = json.loads(data)
    except ValueError:
        raise CorruptArchiveError(f"{path}: {MANIFEST} is not valid JSON; the archive is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArchiveError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                                  f"is not {FORMAT!r}; pack it again with this sd3plugin")
    return manifest


class _open_stream:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if not self.path.is_file():
            raise CacheNotFoundError(f"archive {str(self.path)!r} does not exist")
        self.raw = open(self.path, "rb")
        try:
            self.reader = zstandard.ZstdDecompressor().stream_reader(self.raw)
            self.tar = tarfile.open(fileobj=self.reader, mode="r|")
        except (zstandard.ZstdError, tarfile.TarError, EOFError) as exc:
            self.raw.close()
            raise _truncated(self.path, exc) from None
        return self.tar, self.reader

    def __exit__(self, *exc):
        try:
            self.tar.close()
        except Exception:
            pass
        self.raw.close()
        return False


def _truncated(path, exc) -> CorruptArchiveError:
    return CorruptArchiveError(f"{path}: cannot read the archive ({type(exc).__name__}: {exc}); it is truncated "
                               "or not a zstd-compressed sd3plugin cache archive; get a fresh copy")


# -- install ----------------------------------------------------------------------------------------
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
            lock_timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Verify ``archive`` completely, then install it into the cache dir ``root``."""
    archive, root = Path(archive).expanduser(), Path(root).expanduser()
    if not archive.is_file():
        raise CacheNotFoundError(f"archive {str(archive)!r} does not exist")
    digest = file_sha256(archive)
    if expect_sha256 is not None and digest != expect_sha256.strip().lower():
        raise CorruptArchiveError(f"{archive}: sha256 is {digest}, expected {expect_sha256}; this is not the "
                                  "archive you pinned; refusing to install")
    manifest = scan(archive)  # pass 1: nothing is written
    warnings = check_compatibility(manifest, force)
    if root.exists() and not root.is_dir():
        raise CacheWriteError(f"--cache-dir {str(root)!r} exists and is not a folder")
    with cache_lock(root, lock_timeout, "install into"):
        for stale in root.glob(".install-*"):  # left by an install that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=root))
        except OSError as exc:
            raise CacheWriteError(f"cannot write into {str(root)!r}: {exc.strerror}") from None
        try:
            scan(archive, extract_to=tmp / "new")  # pass 2: extract, checking every byte again
            replaced = _move_into_place(tmp / "new", root, tmp)
            record = {"archive": str(archive), "archive_sha256": digest, "installed": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forced": bool(force and warnings), "manifest": {
                k: v for k, v in manifest.items() if k != "files"}, "files": len(manifest["files"])}
            history = (store.read_json(root / store.INSTALLED) or {}).get("history", [])
            record["history"] = history[-9:] + [{k: record[k] for k in ("archive", "archive_sha256", "installed")}]
            store.write_json(root / store.INSTALLED, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"archive": str(archive), "archive_sha256": digest, "cache_dir": str(root), "warnings": warnings,
            "replaced_entries": replaced, "files": len(manifest["files"]),
            "entries": [e.get("fingerprint") for e in manifest.get("entries", [])],
            "total_bytes": manifest.get("total_bytes")}


def _move_into_place(new: Path, root: Path, tmp: Path) -> list[str]:
    """Inductor files first (each one atomic, content-addressed), then each entry by one rename."""
    src = new / store.INDUCTOR
    if src.is_dir():
        for dirpath, _, filenames in os.walk(src):
            rel_dir = Path(dirpath).relative_to(new)
            (root / rel_dir).mkdir(parents=True, exist_ok=True)
            for name in filenames:
                os.replace(Path(dirpath) / name, root / rel_dir / name)
    replaced = []
    src = new / store.ENTRIES
    if src.is_dir():
        (root / store.ENTRIES).mkdir(parents=True, exist_ok=True)
        for d in sorted(src.iterdir()):
            dest = root / store.ENTRIES / d.name
            if dest.exists():
                os.rename(dest, tmp / f"replaced-{d.name}")
                replaced.append(d.name)
            os.rename(d, dest)
    return replaced
