"""Reading an archive: one file descriptor, hashed; a bounded zstd stream; a bounded tar parser.

``Source`` opens the archive once (non-blocking, checked as a regular file) and hashes every byte read
through it. ``Stream`` decompresses it through ``zstd_frames.FrameWalker`` (data frames only, the
allowance from the payload) in exact amounts, capped. ``TarReader`` parses ustar / GNU / PAX headers
itself, not with ``tarfile``: every header is checked before anything it announces is read (size caps on
PAX and GNU long-name headers, no sparse files), so memory and time are bounded whatever the archive.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import zstandard

from ..regular_file import NotRegularFile, open_regular
from .archive_limits import (BLOCK, CHUNK, MAX_EXTENDED_HEADERS, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, MAX_RATIO,
                             MAX_TRAILING, MAX_WINDOW_LOG, RATIO_SLACK)
from .errors import CacheNotFoundError, CorruptArchiveError
from .zstd_frames import FrameWalker


def file_sha256(path: str | Path) -> str:
    with Source(Path(path)) as src:
        return src.hash_all()


class Source:
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


class Stream:
    """The decompressed tar stream, read in exact amounts, capped at ``limit`` bytes."""

    def __init__(self, source: Source, path: Path):
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
            raise unreadable(self.path, exc) from None

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


def unreadable(path, exc) -> CorruptArchiveError:
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


class Member:
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


class TarReader:
    """ustar / GNU / PAX headers, each checked before anything it announces is read."""

    def __init__(self, stream: Stream, path: Path):
        self.stream, self.path = stream, path

    def _refuse(self, what: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{self.path}: {what}; refusing the archive before reading it further")

    def skip_padding(self, size: int) -> None:
        pad = -size % BLOCK
        if pad:
            self.stream.read(pad)

    def next(self) -> Member | None:
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
                    self._set(pending, "path", self._name(data.split(b"\0", 1)[0]))
                elif type_ == b"K":
                    self._set(pending, "linkpath", data.split(b"\0", 1)[0].decode("utf-8", "replace"))
                else:
                    self._pax(data, pending, type_ == b"x")
                continue
            name = pending.get("path", name)
            size = pending.get("size", size)
            if type_ == b"S" or pending.get("sparse"):
                raise self._refuse(f"member {name!r} is a GNU sparse file ({size} bytes declared); cache "
                                   "archives hold only regular files and folders")
            return Member(name, type_, size, mode, pending.get("linkpath", linkname))

    def _set(self, pending: dict, key: str, value) -> None:
        """One extended header's field for the next member. Set twice (a PAX path and a GNU long name, two
        PAX sizes ...) is refused: tar readers disagree on which one wins, so the archive would mean one
        thing to this reader and another to the tool that checked it."""
        if key in pending:
            raise self._refuse(f"a member whose {key} is given twice by extended headers "
                               f"({str(pending[key])[:60]!r} and {str(value)[:60]!r})")
        pending[key] = value

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
                self._set(pending, "path", self._name(value))
            elif key == "linkpath":
                self._set(pending, "linkpath", value.decode("utf-8", "replace"))
            elif key == "size":
                if not value.isdigit() or len(value) > 20:
                    raise self._refuse("a PAX header with a malformed size")
                self._set(pending, "size", int(value))
