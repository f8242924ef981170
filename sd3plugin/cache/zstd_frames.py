"""The compressed bytes of an archive, walked frame by frame as the decompressor reads them.

A zstd file is a sequence of frames. Data frames hold the archive; *skippable* frames (magic
``0x184D2A5?``) hold anything at all and the decompressor silently steps over them, so they could carry
data that no check sees, and their padding would count toward the decompression allowance (unpacked
bytes per archive byte). ``pack`` never writes them: ``FrameWalker`` refuses a skippable frame, or any
byte that does not start a data frame, wherever it is (before, between or after the data frames), and
counts the *payload*: the bytes of the data blocks, without frame and block headers, so empty blocks
or frames add nothing to the allowance either.

The walker sees every byte in the order the decompressor does (it wraps the source the decompressor
reads), so nothing is read twice and a file changed meanwhile cannot show the walker other bytes.
Frame format: RFC 8878, section 3.1.
"""
from __future__ import annotations

from .errors import CorruptArchiveError

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MASK, SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_DICT_ID_BYTES = (0, 1, 2, 4)
_FCS_BYTES = (0, 2, 4, 8)


class FrameWalker:
    """A file-like reader over ``source`` that checks the zstd frame structure of what passes through."""

    def __init__(self, source, path):
        self.source, self.path = source, path
        self.offset = 0      # file offset of the next byte to walk
        self.payload = 0     # bytes of data blocks seen so far
        self.frames = 0
        self._state, self._need, self._buf, self._skip = "magic", 4, b"", 0
        self._checksum = False

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self._walk(data)
        return data

    @property
    def at_frame_boundary(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip

    def _walk(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                self._skip -= k
                pos += k
                self.offset += k
                continue
            k = min(self._need - len(self._buf), end - pos)
            self._buf += data[pos:pos + k]
            pos += k
            self.offset += k
            if len(self._buf) == self._need:
                header, self._buf = self._buf, b""
                getattr(self, "_" + self._state)(header)

    def _refuse(self, what: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{self.path}: {what}; it was altered or is not an sd3plugin cache archive; "
                                   "refusing it")

    def _magic(self, raw: bytes) -> None:
        magic = int.from_bytes(raw, "little")
        at = self.offset - 4
        if magic == ZSTD_MAGIC:
            self._state, self._need = "descriptor", 1
            self.frames += 1
        elif magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC:
            raise self._refuse(f"a zstd skippable frame at byte {at} (data that is not part of the archive; "
                               "sd3plugin never writes one)")
        elif at == 0:
            raise CorruptArchiveError(f"{self.path}: not a zstd-compressed sd3plugin cache archive (it does not "
                                      "start with a zstd frame); get a fresh copy")
        else:
            raise self._refuse(f"data after the end of the compressed stream (byte {at} starts no zstd frame)")

    def _descriptor(self, raw: bytes) -> None:
        d = raw[0]
        if d & 0x08:
            raise self._refuse(f"a zstd frame header with the reserved bit set (byte {self.offset - 1})")
        single_segment = (d >> 5) & 1
        self._checksum = bool((d >> 2) & 1)
        fcs = _FCS_BYTES[d >> 6] or (1 if single_segment else 0)
        self._skip = (0 if single_segment else 1) + _DICT_ID_BYTES[d & 3] + fcs
        self._state, self._need = "block", 3

    def _block(self, raw: bytes) -> None:
        v = int.from_bytes(raw, "little")
        last, kind, size = v & 1, (v >> 1) & 3, v >> 3
        if kind == 3:
            raise self._refuse(f"a zstd block of the reserved type (byte {self.offset - 3})")
        data = 1 if kind == 1 else size  # an RLE block stores one byte
        self.payload += data
        self._skip = data + (4 if last and self._checksum else 0)
        self._state, self._need = ("magic", 4) if last else ("block", 3)
