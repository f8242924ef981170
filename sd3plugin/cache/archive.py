"""Cache archives: a zstandard-compressed tar stream whose first member is ``manifest.json``.

The manifest lists every file with its size and sha256, the environment it was built on and the
entries (config, fingerprint, shapes). ``install`` opens the archive once and reads every byte through
that one file descriptor, hashing it (what is hashed is what is unpacked): with a trusted key or
``--expect-sha256`` it first hashes the file and checks the signature / pin, then reads the stream once
without writing anything (checksums, member safety, completeness), checks compatibility, then, under
the cache dir's lock, reads it again into a staging folder inside the cache dir and moves the content
into place under a journal (``store.Transaction``): all or nothing, even against SIGKILL.

The tar stream is parsed here, not by ``tarfile``: every header is checked before its data is read
(size caps on PAX and GNU long-name headers, no sparse files, only regular files and folders, each
member's declared size equal to the manifest's), and the decompressed stream is capped, so memory and
time are bounded whatever the archive (limits below and in docs/cache.md, "Guarantees").

An archive is code: its Mega-Cache blobs and inductor entries are pickles and compiled libraries that
torch loads and runs. Install archives only from sources you trust: sign them (``pack --sign``) and
install with ``--trust`` (or ``SD3PLUGIN_TRUSTED_KEY``), or pin them with ``--expect-sha256``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

import zstandard

from . import precompiled, signing, store
from .errors import (CacheError, CacheNotFoundError, CacheWriteError, CorruptArchiveError,
                     IncompatibleCacheError)
from .lock import DEFAULT_TIMEOUT_S, cache_lock
from .manifest import compatibility, environment
from .zstd_frames import FrameWalker
from ..regular_file import NotRegularFile, open_regular

FORMAT = "sd3plugin-cache/1"
MANIFEST = "manifest.json"
CHUNK = 1 << 20
BLOCK = 512

# Limits of what install and info read (docs/cache.md, "Guarantees").
MAX_MANIFEST_BYTES = 4 * 2**20      # about 20,000 files; pack refuses to write a larger one
MAX_JSON_CONTAINERS = 200_000       # JSON objects + arrays in the manifest (bounds its memory)
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 64 * 2**10       # one PAX or GNU long-name header
MAX_EXTENDED_HEADERS = 4            # PAX / long-name headers before one member
MAX_WINDOW_LOG = 25                 # zstd window: 32 MiB (pack uses at most this)
MAX_RATIO = 1000                    # unpacked bytes per archive byte, beyond RATIO_SLACK
RATIO_SLACK = 64 * 2**20
MAX_TRAILING = 2**20                # zero padding accepted after the end-of-archive blocks
MAX_NAME = 1024                     # bytes (UTF-8) of one member's path
MAX_DEPTH = 16                      # folders in one member's path (real caches use at most 6)
MAX_FOLDER_PREFIX_BYTES = 32 * 2**20  # sum over names of (bytes x depth): bounds the folder set built
MAX_FOLDERS = 400_000               # sum over names of depth

_FP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- pack -------------------------------------------------------------------------------------------
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
        if len(manifest_bytes) > MAX_MANIFEST_BYTES or _containers(manifest_bytes) > MAX_JSON_CONTAINERS:
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


def _entry_file(parts: list[str]) -> bool:
    """entries/<fingerprint>/<file>, or entries/<fingerprint>/precompiled/<file> (the precompiled blocks)."""
    return len(parts) == 3 or (len(parts) == 4 and parts[2] == precompiled.FOLDER)


def _packable(root: Path, listed: set):
    """Every packable file; files of an entry folder without a readable entry.json are left out."""
    for rel, path in store.iter_files(root):
        parts = rel.split("/")
        if parts[0] == store.ENTRIES and (not _entry_file(parts) or parts[1] not in listed):
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
        raise CacheWriteError(f"cannot write {str(output)!r}: {_why(exc)}; free some space or choose another "
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


def _why(exc) -> str:
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


# -- reading: one file descriptor, hashed; a bounded zstd stream; a bounded tar parser ----------------
def file_sha256(path: str | Path) -> str:
    with _Source(Path(path)) as src:
        return src.hash_all()


class _Source:
    """The archive, opened once. Every byte read through it is hashed; ``restart`` reads it again from
    the same descriptor (a file swapped at the path meanwhile is never seen)."""

    def __init__(self, path: Path):
        self.path = path
        try:  # O_NONBLOCK + fstat: a FIFO or device is refused, never waited on
            fd, st = open_regular(path)
        except FileNotFoundError:
            raise CacheNotFoundError(f"archive {str(path)!r} does not exist") from None
        except NotRegularFile as exc:
            raise CacheNotFoundError(f"archive {str(path)!r} {exc.strerror}; give the path of a .tar.zst "
                                     "file") from None
        except OSError as exc:
            raise CacheNotFoundError(f"cannot open archive {str(path)!r}: {exc.strerror}") from None
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.size = st.st_size
        self.restart()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def restart(self) -> None:
        self.f.seek(0)
        self.sha256, self.count = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        try:
            data = self.f.read(n)
        except OSError as exc:
            raise CorruptArchiveError(f"{self.path}: cannot read the archive: {exc.strerror}") from None
        self.sha256.update(data)
        self.count += len(data)
        return data

    def hash_all(self) -> str:
        self.restart()
        while self.read(CHUNK):
            pass
        return self.sha256.hexdigest()


class _Stream:
    """The decompressed tar stream, read in exact amounts, capped at ``limit`` bytes."""

    def __init__(self, source: _Source, path: Path):
        self.path = path
        self.frames = FrameWalker(source, path)  # only zstd data frames; counts the payload
        dctx = zstandard.ZstdDecompressor(max_window_size=2**MAX_WINDOW_LOG)
        self.reader = dctx.stream_reader(self.frames, read_size=CHUNK, read_across_frames=True, closefd=False)
        self.pos = 0
        self.limit = MAX_MANIFEST_BYTES + (MAX_EXTENDED_HEADERS + 4) * (MAX_HEADER_BYTES + BLOCK)

    def _read_some(self, n: int) -> bytes:
        try:
            return self.reader.read(n)
        except zstandard.ZstdError as exc:
            raise _unreadable(self.path, exc) from None

    def read(self, n: int) -> bytes:
        return b"".join(self.chunks(n))

    def chunks(self, n: int):
        """``n`` bytes in pieces of at most CHUNK; CorruptArchiveError if the stream ends first or the
        cap would be passed."""
        if self.pos + n > self.limit:
            raise CorruptArchiveError(
                f"{self.path}: the archive unpacks to more than its manifest declares (over {self.limit} "
                "bytes); a decompression bomb or an altered archive; refusing it")
        while n:
            chunk = self._read_some(min(n, CHUNK))
            if not chunk:
                raise CorruptArchiveError(f"{self.path}: the archive ends in the middle of a member; it is "
                                          "truncated; get a fresh copy")
            n -= len(chunk)
            self.pos += len(chunk)
            self._check_ratio()
            yield chunk

    def _check_ratio(self) -> None:
        """The allowance comes from the payload read so far (data blocks, not headers or padding)."""
        if self.pos > MAX_RATIO * self.frames.payload + RATIO_SLACK:
            raise CorruptArchiveError(
                f"{self.path}: the archive unpacks to over {MAX_RATIO}x its compressed payload "
                f"({self.frames.payload} bytes of data blocks so far) + {RATIO_SLACK >> 20} MiB: a decompression "
                "bomb; refusing it")

    def finish(self) -> None:
        """After the end-of-archive block: only zero padding (at most MAX_TRAILING bytes) may follow."""
        left = MAX_TRAILING
        while True:
            chunk = self._read_some(min(CHUNK, left + 1))
            if not chunk:
                return
            left -= len(chunk)
            if left < 0 or chunk.count(0) != len(chunk):
                raise CorruptArchiveError(f"{self.path}: data after the end of the archive; it was altered; "
                                          "refusing it")


def _unreadable(path, exc) -> CorruptArchiveError:
    msg = str(exc)
    if "memory" in msg.lower() or "window" in msg.lower():
        return CorruptArchiveError(f"{path}: the zstd stream needs a window over {2**MAX_WINDOW_LOG >> 20} MiB "
                                   f"({msg}); pack it again with this sd3plugin")
    return CorruptArchiveError(f"{path}: cannot read the archive ({type(exc).__name__}: {msg}); it is truncated "
                               "or not a zstd-compressed sd3plugin cache archive; get a fresh copy")


_REGULAR = (b"0", b"\0", b"7")
_EXTENDED = {b"x": "PAX header", b"g": "global PAX header", b"L": "GNU long-name header",
             b"K": "GNU long-link header"}
_OTHER = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
          b"6": "FIFO", b"S": "GNU sparse file", b"V": "volume label", b"M": "multi-volume continuation",
          b"N": "GNU old long name"}
_GLOBAL_OK = {"comment", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "charset", "hdrcharset"}


class _Member:
    __slots__ = ("name", "type", "size", "mode", "linkname")

    def __init__(self, name, type_, size, mode, linkname):
        self.name, self.type, self.size, self.mode, self.linkname = name, type_, size, mode, linkname

    @property
    def isreg(self) -> bool:
        return self.type in _REGULAR

    @property
    def isdir(self) -> bool:
        return self.type == b"5"

    @property
    def kind(self) -> str:
        return "file" if self.isreg else "folder" if self.isdir else _OTHER.get(self.type, f"type {self.type!r}")


class _TarReader:
    """ustar / GNU / PAX headers, each checked before anything it announces is read."""

    def __init__(self, stream: _Stream, path: Path):
        self.stream, self.path = stream, path

    def _refuse(self, what: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{self.path}: {what}; refusing the archive before reading it further")

    def skip_padding(self, size: int) -> None:
        pad = -size % BLOCK
        if pad:
            self.stream.read(pad)

    def next(self) -> _Member | None:
        pending: dict = {}
        extended = 0
        while True:
            block = self.stream.read(BLOCK)
            if block.count(0) == BLOCK:
                return None
            name, type_, size, mode, linkname = self._header(block)
            if type_ in _EXTENDED:
                extended += 1
                if extended > MAX_EXTENDED_HEADERS:
                    raise self._refuse(f"more than {MAX_EXTENDED_HEADERS} extended headers before one member")
                if size > MAX_HEADER_BYTES:
                    raise self._refuse(f"a {_EXTENDED[type_]} of {size} bytes (the limit is {MAX_HEADER_BYTES})")
                data = self.stream.read(size)
                self.skip_padding(size)
                if type_ == b"L":
                    pending["path"] = self._name(data.split(b"\0", 1)[0])
                elif type_ == b"K":
                    pending["linkpath"] = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                else:
                    self._pax(data, pending, type_ == b"x")
                continue
            name = pending.get("path", name)
            size = pending.get("size", size)
            if type_ == b"S" or pending.get("sparse"):
                raise self._refuse(f"member {name!r} is a GNU sparse file ({size} bytes declared); cache "
                                   "archives hold only regular files and folders")
            return _Member(name, type_, size, mode, pending.get("linkpath", linkname))

    def _header(self, block: bytes):
        stored = self._number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b >= 128)
        if stored not in (unsigned, signed):
            raise self._refuse("a tar header with a wrong checksum (damaged or not a tar stream)")
        name = self._name(block[:100].split(b"\0", 1)[0])
        type_ = block[156:157]
        size = self._number(block[124:136], "size")
        mode = self._number(block[100:108], "mode") if block[100:108].strip(b"\0 ") else 0
        if block[257:265] == b"ustar\x0000":
            prefix = self._name(block[345:500].split(b"\0", 1)[0])
            if prefix:
                name = f"{prefix}/{name}"
        linkname = block[157:257].split(b"\0", 1)[0].decode("utf-8", "replace")
        return name, type_, size, mode, linkname

    def _number(self, field: bytes, what: str) -> int:
        if field[:1] and field[0] & 0x80:  # GNU base-256
            if field[0] == 0xFF:
                raise self._refuse(f"a tar header with a negative {what}")
            return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        text = field.split(b"\0", 1)[0].strip(b" ")
        try:
            return int(text, 8) if text else 0
        except ValueError:
            raise self._refuse(f"a tar header whose {what} field is not a number") from None

    def _name(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(f"a member name that is not UTF-8 ({raw[:60]!r})") from None

    def _pax(self, data: bytes, pending: dict, local: bool) -> None:
        pos = 0
        while pos < len(data):
            if data[pos:].count(0) == len(data) - pos:
                break
            m = re.match(rb"(\d{1,6}) ", data[pos:pos + 8])
            length = int(m.group(1)) if m else 0
            end = pos + length
            if not m or length <= len(m.group(0)) or end > len(data) or data[end - 1:end] != b"\n":
                raise self._refuse("a malformed PAX header")
            key, sep, value = data[pos + len(m.group(0)):end - 1].partition(b"=")
            if not sep:
                raise self._refuse("a malformed PAX header")
            key = key.decode("utf-8", "replace")
            pos = end
            if key.startswith("GNU.sparse."):
                pending["sparse"] = True
            elif not local:
                if key not in _GLOBAL_OK:
                    raise self._refuse(f"a global PAX header that sets {key!r}")
            elif key == "path":
                pending["path"] = self._name(value)
            elif key == "linkpath":
                pending["linkpath"] = value.decode("utf-8", "replace")
            elif key == "size":
                if not value.isdigit() or len(value) > 20:
                    raise self._refuse("a PAX header with a malformed size")
                pending["size"] = int(value)


# -- member names and the manifest --------------------------------------------------------------------
# C0 and C1 control characters, DEL, lone surrogates (not encodable, so not a file name), line and paragraph
# separators and bidirectional overrides (they make one line print as two, or in another order)
_UNSAFE_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_member_name(name: str) -> str:
    """The member's safe relative path, or CorruptArchiveError for absolute paths, ``..`` and strays.

    Checked in an order that bounds work and memory whatever the name: type, characters, length in
    bytes and depth first, only then split into parts."""
    if not isinstance(name, str):
        raise CorruptArchiveError(f"unsafe archive member {name!r}: not a name; refusing to install")
    shown = ascii(name[:80]) + ("..." if len(name) > 80 else "")
    if not name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise CorruptArchiveError(f"unsafe archive member {shown}: absolute path; refusing to install")
    if len(name) > MAX_NAME or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise CorruptArchiveError(f"unsafe archive member {shown}: a name over {MAX_NAME} bytes (UTF-8); "
                                  "refusing to install")
    bad_char = _UNSAFE_CHAR.search(name)
    if bad_char:
        raise CorruptArchiveError(f"unsafe archive member {shown}: a control character, line separator or lone "
                                  f"surrogate ({ascii(bad_char.group())}) in the name; refusing to install")
    if name.count("/") > MAX_DEPTH:
        raise CorruptArchiveError(f"unsafe archive member {shown}: over {MAX_DEPTH} folders deep; refusing "
                                  "to install")
    parts = name.split("/")
    if parts[-1] == "":  # a folder member's trailing slash
        parts = parts[:-1]
    if any(p in ("..", ".", "") for p in parts):
        raise CorruptArchiveError(f"unsafe archive member {shown}: '..' or '.' in the path, or an empty part; "
                                  "refusing to install")
    if parts[0] not in store.PACKED_DIRS:
        raise CorruptArchiveError(f"unsafe archive member {shown}: outside {'/, '.join(store.PACKED_DIRS)}/, "
                                  "the only folders of a cache archive; refusing to install")
    if any(len(p.encode()) > 255 for p in parts):
        raise CorruptArchiveError(f"unsafe archive member {shown}: a path component over 255 bytes; "
                                  "refusing to install")
    return "/".join(parts)


def _check_member_type(m: _Member) -> None:
    if m.isreg or m.isdir:
        return
    target = f" -> {m.linkname}" if m.type in (b"1", b"2") else ""
    raise CorruptArchiveError(f"unsafe archive member {m.name!r}{target}: a {m.kind}; cache archives hold "
                              "only regular files and folders; refusing to install")


def _containers(data: bytes) -> int:
    return data.count(b"{") + data.count(b"[")


def parse_manifest(data: bytes, path) -> dict:
    """The manifest, checked: types, names, sizes, checksums, entries. CorruptArchiveError otherwise."""
    def bad(what):
        return CorruptArchiveError(f"{path}: {MANIFEST} {what}; the archive was altered or damaged")

    if _containers(data) > MAX_JSON_CONTAINERS:
        raise bad(f"has over {MAX_JSON_CONTAINERS} JSON objects and arrays (the limit)")
    try:
        manifest = json.loads(data)
    except RecursionError:
        raise bad("is nested too deeply") from None
    except ValueError:
        raise CorruptArchiveError(f"{path}: {MANIFEST} is not valid JSON; the archive is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArchiveError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                                  f"is not {FORMAT!r}; pack it again with this sd3plugin")
    stack = [(manifest, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"is nested over {MAX_JSON_DEPTH} levels deep")
        children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        strings = list(obj) if isinstance(obj, dict) else []
        strings += [c for c in children if isinstance(c, str)]
        if any(_has_surrogate(x) for x in strings):
            raise bad("has a string with a lone surrogate (not Unicode text)")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptArchiveError(f"{path}: manifest has no file list; not an sd3plugin cache archive")
    for name, info in files.items():  # every name checked (bytes, depth) before any is expanded
        rel = check_member_name(name)
        if rel != name:
            raise bad(f"lists {ascii(name[:80])}, not a normalised path")
        if (not isinstance(info, dict) or type(info.get("size")) is not int or info["size"] < 0
                or not isinstance(info.get("sha256"), str) or not _HEX64.fullmatch(info["sha256"])):
            raise bad(f"has no valid size and sha256 for {ascii(name[:80])}")
    folders = manifest_folders(files, path)
    clash = folders & set(files)
    if clash:
        raise CorruptArchiveError(f"{path}: member {sorted(clash)[0]!r} is both a file and a folder; the archive "
                                  "was altered")
    for name in files:
        parts = name.split("/")
        if len(parts) < 2:
            raise bad(f"lists {name!r} as a file: it is the folder of the cache archive's {name}/ files")
        if parts[0] == store.ENTRIES and not _entry_file(parts):
            raise bad(f"lists {name!r}: entry files are entries/<fingerprint>/<file> or "
                      f"entries/<fingerprint>/{precompiled.FOLDER}/<file>")
    total = sum(f["size"] for f in files.values())
    if manifest.get("total_bytes") != total or type(manifest.get("total_bytes")) is not int:
        raise bad(f"declares total_bytes {manifest.get('total_bytes')!r}, its files sum to {total}")
    entries = manifest.get("entries", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("has no valid entry list")
    fps = set()
    for e in entries:
        fp = e.get("fingerprint")
        if not isinstance(fp, str) or not _FP_RE.fullmatch(fp) or fp in fps:
            raise bad(f"has an entry with an invalid or repeated fingerprint {fp!r}")
        fps.add(fp)
        if f"{store.ENTRIES}/{fp}/{store.ENTRY_FILE}" not in files:
            raise bad(f"lists entry {fp} without its {store.ENTRIES}/{fp}/{store.ENTRY_FILE}")
        for key, kind in (("config", dict), ("composed_config", dict), ("environment", dict), ("shapes", list),
                          ("blobs", dict)):
            if e.get(key) is not None and not isinstance(e[key], kind):
                raise bad(f"has an entry {fp} whose {key} is not a JSON {'object' if kind is dict else 'array'}")
    for name in files:
        parts = name.split("/")
        if parts[0] == store.ENTRIES and parts[1] not in fps:
            raise bad(f"lists {name!r} of an entry it does not describe")
    env = manifest.get("environment", {})
    if not isinstance(env, dict) or not _plain_environment(env):
        raise bad("has no valid environment (values are plain strings, numbers or null, without control "
                  "characters)")
    for e in entries:
        if not _plain_environment(e.get("environment") or {}):
            raise bad(f"has an entry {e['fingerprint']} without a valid environment")
    return manifest


def _plain_environment(env: dict) -> bool:
    """Values that messages print as they are: no containers, no control characters (one line)."""
    return all(not isinstance(v, (dict, list)) and not (isinstance(v, str) and _UNSAFE_CHAR.search(v))
               and not _UNSAFE_CHAR.search(k) for k, v in env.items())


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def manifest_folders(files: dict, path) -> set[str]:
    """Every folder the (already name-checked) ``files`` imply. The work and memory this takes are
    bounded before anything is built: the sum over names of (bytes x depth) is checked first."""
    depth = sum(n.count("/") for n in files)  # names are checked: at most MAX_NAME bytes, MAX_DEPTH deep
    expanded = sum(len(n) * n.count("/") for n in files)
    if depth > MAX_FOLDERS or expanded > MAX_FOLDER_PREFIX_BYTES:
        raise CorruptArchiveError(f"{path}: {MANIFEST} lists names whose folders add up to over "
                                  f"{MAX_FOLDER_PREFIX_BYTES} bytes (too many or too deeply nested names for a "
                                  "cache archive); the archive was altered")
    folders: set[str] = set()
    for n in files:
        i = n.find("/")
        while i != -1:
            folders.add(n[:i])
            i = n.find("/", i + 1)
    return folders


def _bomb_check(manifest: dict, source: _Source, path) -> None:
    total = manifest["total_bytes"]
    allowed = MAX_RATIO * source.size + RATIO_SLACK
    if total > allowed:
        raise CorruptArchiveError(f"{path}: the manifest declares {total} bytes of files in a {source.size}-byte "
                                  f"archive (over {MAX_RATIO}x + {RATIO_SLACK >> 20} MiB): a decompression bomb; "
                                  "refusing it before unpacking anything")


def _scan(source: _Source, path: Path, extract_to: Path | None = None, manifest_only: bool = False):
    """Read the archive from the start through ``source`` checking every member against the manifest
    (optionally writing the files under ``extract_to``); return (manifest, sha256 of the bytes read)."""
    source.restart()
    if source.size == 0:
        raise CorruptArchiveError(f"{path}: an empty file, not an sd3plugin cache archive (make one with "
                                  "`sd3plugin-cache pack`)")
    stream = _Stream(source, path)
    tar = _TarReader(stream, path)
    first = tar.next()
    if first is None:
        raise CorruptArchiveError(f"{path}: the archive is empty; not an sd3plugin cache archive (make one "
                                  "with `sd3plugin-cache pack`)")
    if first.name != MANIFEST or not first.isreg:
        raise CorruptArchiveError(f"{path}: the first member is not {MANIFEST}; not an sd3plugin cache archive "
                                  "(make one with `sd3plugin-cache pack`)")
    if first.size > MAX_MANIFEST_BYTES:
        raise CorruptArchiveError(f"{path}: {MANIFEST} is {first.size} bytes, over the limit of "
                                  f"{MAX_MANIFEST_BYTES} bytes; refusing it before reading it")
    data = stream.read(first.size)
    tar.skip_padding(first.size)
    manifest = parse_manifest(data, path)
    del data
    if manifest_only:
        return manifest, None
    _bomb_check(manifest, source, path)
    files = manifest["files"]
    folders = manifest_folders(files, path)
    overhead = (len(files) + len(folders) + 2) * (MAX_EXTENDED_HEADERS * (MAX_HEADER_BYTES + BLOCK) + 2 * BLOCK)
    stream.limit = min(stream.pos + manifest["total_bytes"] + overhead + MAX_TRAILING,
                       MAX_RATIO * source.size + RATIO_SLACK)
    seen: set[str] = set()
    dirs_seen: set[str] = set()
    while (m := tar.next()) is not None:
        rel = check_member_name(m.name.rstrip("/") if m.isdir else m.name)
        _check_member_type(m)
        if m.isdir:
            if rel in files:
                raise CorruptArchiveError(f"{path}: member {rel!r} is both a file and a folder; the archive was "
                                          "altered")
            if rel not in folders:
                raise CorruptArchiveError(f"{path}: member {rel!r} (a folder) is not in the manifest; the archive "
                                          "was altered")
            if rel in dirs_seen or m.size:
                raise CorruptArchiveError(f"{path}: folder member {rel!r} appears twice or carries data; the "
                                          "archive was altered")
            dirs_seen.add(rel)
            if extract_to is not None:
                (extract_to / rel).mkdir(parents=True, exist_ok=True)
            continue
        if rel in folders:
            raise CorruptArchiveError(f"{path}: member {rel!r} is both a file and a folder; the archive was "
                                      "altered")
        if rel not in files:
            raise CorruptArchiveError(f"{path}: member {rel!r} is not in the manifest; the archive was altered")
        if rel in seen:
            raise CorruptArchiveError(f"{path}: member {rel!r} appears twice; the archive was altered")
        expected = files[rel]
        if m.size != expected["size"]:
            raise CorruptArchiveError(f"{path}: member {rel!r} declares {m.size} bytes, the manifest "
                                      f"{expected['size']}; the archive was altered; refusing it before reading "
                                      "its data")
        seen.add(rel)
        _copy_member(stream, tar, m, rel, expected, path, extract_to)
    missing = sorted(set(files) - seen)
    if missing:
        raise CorruptArchiveError(f"{path}: {len(missing)} file(s) of the manifest are missing (first: "
                                  f"{missing[0]!r}); the archive is truncated or incomplete")
    stream.finish()
    if stream.frames.read(1) or not stream.frames.at_frame_boundary:
        raise CorruptArchiveError(f"{path}: data after the end of the compressed stream; it was altered; "
                                  "refusing it")
    return manifest, source.sha256.hexdigest()


def _copy_member(stream, tar, m, rel, expected, path, extract_to) -> None:
    h, out = hashlib.sha256(), None
    if extract_to is not None:
        dest = extract_to / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o755 if m.mode & 0o100 else 0o644)
        out = os.fdopen(fd, "wb")
    try:
        for chunk in stream.chunks(m.size):
            h.update(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    tar.skip_padding(m.size)
    if h.hexdigest() != expected["sha256"]:
        raise CorruptArchiveError(f"{path}: checksum mismatch for {rel!r} (manifest sha256 "
                                  f"{expected['sha256'][:16]}..., archive {h.hexdigest()[:16]}...); "
                                  "the archive was altered or damaged; get a fresh copy")


def read_manifest(path: str | Path) -> dict:
    """The manifest of an archive (reads only the first member; loads nothing)."""
    path = Path(path).expanduser()
    with _Source(path) as src:
        return _scan(src, path, manifest_only=True)[0]


def scan(path: str | Path) -> dict:
    """Read the whole archive, checking every member against the manifest; write nothing."""
    path = Path(path).expanduser()
    with _Source(path) as src:
        return _scan(src, path)[0]


def signature_status(path: str | Path, trust: list[str] | None = None) -> dict:
    """Whether ``path`` has a signature beside it, by which key, and whether a trusted key verifies it."""
    path = Path(path).expanduser()
    sig = Path(str(path) + signing.SUFFIX)
    keys = signing.trusted_keys(trust)  # a trust setting that names no key is an error here too
    out = {"file": str(sig), "present": sig.is_file(), "key_id": None, "verified": None}
    if not out["present"]:
        return out
    try:
        out["key_id"] = signing.read_signature(sig, path).get("key-id")
        if keys:
            with _Source(path) as src:
                signing.check(path, sig, src.hash_all(), keys)
            out["verified"] = True
    except CacheError as exc:
        out["verified"], out["error"] = False, str(exc)
    return out


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
        if not _HEX64.fullmatch(expect_sha256):
            raise ConfigError(f"--expect-sha256 {expect_sha256!r} is not a sha256 (64 hex digits)")
    with _Source(archive) as src:
        pinned, key_id = None, None
        if keys or expect_sha256:  # the raw bytes only: nothing of the archive is parsed before this
            pinned = src.hash_all()
            if expect_sha256 and pinned != expect_sha256:
                raise CorruptArchiveError(f"{archive}: sha256 is {pinned}, expected {expect_sha256}; this is not "
                                          "the archive you pinned; refusing to install")
            if keys:
                sig = Path(signature).expanduser() if signature else Path(str(archive) + signing.SUFFIX)
                key_id = signing.check(archive, sig, pinned, keys)
        manifest, digest = _scan(src, archive)  # pass 1: nothing is written
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
            raise _write_error(root, exc) from None
        try:
            try:
                _, digest2 = _scan(src, archive, extract_to=staging / "new")  # pass 2: every byte again
            except OSError as exc:
                raise _write_error(root, exc) from None
            if digest2 != digest:
                raise CorruptArchiveError(f"{archive}: the archive changed while it was being installed; "
                                          "refusing it (the cache is as it was)")
            record = {"archive": str(archive), "archive_sha256": digest, "installed": store._now(),
                      "forced": bool(force and warnings), "signed_by": key_id,
                      "manifest": {k: v for k, v in manifest.items() if k != "files"},
                      "files": len(manifest["files"])}
            try:
                replaced, kept = _commit(staging, root, manifest, record)
            except OSError as exc:
                raise _write_error(root, exc) from None
        finally:
            journal = store.read_json(staging / store.JOURNAL)
            if not journal or journal.get("state") != "moving":  # else: left for recovery
                shutil.rmtree(staging, ignore_errors=True)
    return {"archive": str(archive), "archive_sha256": digest, "cache_dir": str(root), "warnings": warnings,
        "replaced_entries": replaced, "kept_blobs": kept, "files": len(manifest["files"]),
        "entries": [e.get("fingerprint") for e in manifest.get("entries", [])],
        "total_bytes": manifest.get("total_bytes"), "signed_by": key_id,
        "recovered": held.maintenance["recovered"], "repaired": held.maintenance["repaired"]}


def _write_error(root: Path, exc: OSError) -> CacheWriteError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = "free some space or choose another --cache-dir" if full else "check its permissions or choose another --cache-dir"
    return CacheWriteError(f"cannot write into {str(root)!r}: {_why(exc)}; {hint} (the cache is as it was)")


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


def _check_place(root: Path, rel: str, folder: bool) -> None:
    """CacheWriteError when the cache dir has a file (or link) where ``rel`` needs a folder, or the reverse."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        p = root.joinpath(*parts[:i])
        if os.path.lexists(p) and (p.is_symlink() or not p.is_dir()):
            raise CacheWriteError(f"cannot install {rel}: {p} in the cache dir is a file or a link where the archive "
                                  "has a folder; remove it (`sd3plugin-cache clear`) or choose another --cache-dir "
                                  "(the cache is as it was)")
    p = root / rel
    if os.path.lexists(p) and (folder != (p.is_dir() and not p.is_symlink())):
        have, want = ("a file or a link", "a folder") if folder else ("a folder", "a file")
        raise CacheWriteError(f"cannot install {rel}: the cache dir has {have} there, the archive {want}; remove "
                              "it (`sd3plugin-cache clear`) or choose another --cache-dir (the cache is as it was)")


def _same_file(path: Path, info: dict) -> bool:
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and st.st_size == info["size"] and store.sha256_file(path) == info["sha256"]
    except OSError:
        return False


def _commit(staging: Path, root: Path, manifest: dict, record: dict) -> tuple[list[str], list[str]]:
    """Plan every move (checking for clashes first), merge local blobs into replaced entries, then move
    everything into place under the journal."""
    new = staging / "new"
    files = manifest["files"]
    txn = store.Transaction(root, staging)
    records = store.read_checksums(root)
    for rel in sorted(files):
        _check_place(root, rel if not rel.startswith(store.ENTRIES + "/") else "/".join(rel.split("/")[:2]),
                     folder=rel.startswith(store.ENTRIES + "/"))
    for name in (store.INSTALLED, store.CHECKSUMS):
        _check_place(root, name, folder=False)
    for rel in sorted(r for r in files if r.startswith(store.INDUCTOR + "/")):
        if _same_file(root / rel, files[rel]):  # content-addressed and identical: leave it as it is
            records[rel] = store.file_record(root / rel, files[rel]["sha256"])
            continue
        txn.add(new / rel, rel)
        records[rel] = store.file_record(new / rel, files[rel]["sha256"])
    replaced, kept = [], []
    entries = {e["fingerprint"]: e for e in manifest.get("entries", [])}
    for fp in sorted(entries):
        rel = f"{store.ENTRIES}/{fp}"
        dst = root / rel
        for r in [r for r in records if r.startswith(rel + "/")]:
            records.pop(r)
        if dst.is_dir() and not dst.is_symlink():
            replaced.append(fp)
            kept += [f"{fp}/{n}" for n in _merge_entry(dst, new / rel, entries[fp])]
        for p in sorted((new / rel).rglob("*")):  # the entry's files, its precompiled/ folder's too
            if not p.is_file():
                continue
            name = p.relative_to(new / rel).as_posix()
            known = files.get(f"{rel}/{name}")
            records[f"{rel}/{name}"] = store.file_record(
                p, known["sha256"] if known and name not in _MERGED_FILES else None)
        txn.add(new / rel, rel)
    history = (store.read_json(root / store.INSTALLED) or {}).get("history", [])
    history = history if isinstance(history, list) else []
    record["history"] = history[-9:] + [{k: record[k] for k in ("archive", "archive_sha256", "installed")}]
    store.write_json(new / store.INSTALLED, record)
    txn.add(new / store.INSTALLED, store.INSTALLED)
    store.write_json(new / store.CHECKSUMS, {"format": 1, "files": records})
    txn.add(new / store.CHECKSUMS, store.CHECKSUMS)
    txn.commit()
    return replaced, kept


# files of an entry that _merge_entry may rewrite: their checksum is taken from the staged file
_MERGED_FILES = (store.ENTRY_FILE, f"{precompiled.FOLDER}/{precompiled.INDEX}")


def _merge_entry(old: Path, new: Path, entry: dict) -> list[str]:
    """Keep what the cache's entry has and the archive's lacks (blobs of shapes and precompiled blocks a
    local ``warm`` added): link them into the staged entry and merge its entry.json and block index. Only when both were built for the same
    environment. Returns the names kept."""
    old_meta = store.read_json(old / store.ENTRY_FILE) or {}
    new_meta = store.read_json(new / store.ENTRY_FILE)
    if new_meta is None or not isinstance(old_meta.get("environment"), dict):
        return []
    errors, _ = compatibility(old_meta["environment"], entry.get("environment") or {},
                              (entry.get("config") or {}).get("device"))
    if errors:
        return []
    old_blobs = old_meta.get("blobs") if isinstance(old_meta.get("blobs"), dict) else {}
    if not isinstance(new_meta.get("blobs"), dict):
        new_meta["blobs"] = {}
    kept = []
    for name, info in sorted(old_blobs.items()):
        src, dst = old / name, new / name
        if (not isinstance(name, str) or not name.endswith(store.BLOB_SUFFIX) or "/" in name or name.startswith(".")
                or os.path.lexists(dst) or not src.is_file() or src.is_symlink()):
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        new_meta["blobs"][name] = info
        kept.append(name)
    shapes = new_meta.get("shapes") if isinstance(new_meta.get("shapes"), list) else []
    old_shapes = old_meta.get("shapes") if isinstance(old_meta.get("shapes"), list) else []
    added = [s for s in old_shapes if s not in shapes]
    blocks = _merge_precompiled(old / precompiled.FOLDER, new / precompiled.FOLDER, new_meta,
                                entry.get("environment") or {})
    if kept or added or blocks:
        new_meta["shapes"] = shapes + added
        store.write_json(new / store.ENTRY_FILE, new_meta)
    return kept + blocks


def _merge_precompiled(old: Path, new: Path, new_meta: dict, archive_env: dict) -> list[str]:
    """Keep the precompiled blocks the cache's entry has for inputs (``key``) the archive's lacks (what a
    ``warm`` built while the install was checking the archive, or earlier), as shapes are merged: only
    blocks whose bytes match their index record, of the environment of the archive's blocks. Links them
    into the staged ``precompiled/`` folder, merges its index and the entry's summary; returns the names."""
    old_index = store.read_json(old / precompiled.INDEX)
    if (old.is_symlink() or not isinstance(old_index, dict) or old_index.get("format") != precompiled.FORMAT
            or not isinstance(old_index.get("artefacts"), list)):
        return []
    new_index = store.read_json(new / precompiled.INDEX)
    if isinstance(new_index, dict) and new_index.get("format") == precompiled.FORMAT:
        target_env = new_index.get("environment") if isinstance(new_index.get("environment"), dict) else {}
        records = [r for r in new_index.get("artefacts") or [] if isinstance(r, dict)]
    else:
        target_env, records = archive_env, []
        new_index = {k: v for k, v in old_index.items() if k != "artefacts"}
    old_env = old_index.get("environment") if isinstance(old_index.get("environment"), dict) else {}
    if precompiled.environment_mismatch(old_env, target_env):
        return []  # blocks of another torch / diffusers / sd3plugin would not load: warm rebuilds them
    keys, names, kept = {r.get("key") for r in records}, {r.get("file") for r in records}, []
    for record in old_index["artefacts"]:
        name = record.get("file") if isinstance(record, dict) else None
        if (not isinstance(name, str) or "/" in name or name.startswith(".") or not name.endswith(precompiled.SUFFIX)
                or record.get("key") in keys or name in names):
            continue
        src = old / name
        try:
            if src.is_symlink() or not src.is_file() or store.sha256_file(src) != record.get("sha256"):
                continue  # damaged or replaced: not carried over
            new.mkdir(exist_ok=True)
            try:
                os.link(src, new / name)
            except OSError:
                shutil.copy2(src, new / name)
        except OSError:
            continue
        records.append(record)
        keys.add(record.get("key"))
        names.add(name)
        kept.append(f"{precompiled.FOLDER}/{name}")
    if kept:
        new_index["artefacts"] = records
        store.write_json(new / precompiled.INDEX, new_index)
        new_meta["precompiled"] = {**(new_meta.get("precompiled") if isinstance(new_meta.get("precompiled"), dict)
                                      else {}),
                                   "artefacts": len(records), "size_bytes": sum(r.get("size") or 0 for r in records)}
    return kept
