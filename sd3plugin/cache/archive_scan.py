"""Reading a whole archive through one descriptor, every member checked against the manifest (and
optionally written under a staging folder); the manifest alone for ``info``; signature status."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import signing
from .archive_limits import (BLOCK, MANIFEST, MAX_EXTENDED_HEADERS, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, MAX_RATIO,
                             MAX_TRAILING, RATIO_SLACK)
from .archive_manifest import check_member_name, check_member_type, manifest_folders, parse_manifest
from .errors import CacheError, CorruptArchiveError
from .tar_reader import Source, Stream, TarReader


def bomb_check(manifest: dict, source: Source, path) -> None:
    total = manifest["total_bytes"]
    allowed = MAX_RATIO * source.size + RATIO_SLACK
    if total > allowed:
        raise CorruptArchiveError(f"{path}: the manifest declares {total} bytes of files in a {source.size}-byte "
                                  f"archive (over {MAX_RATIO}x + {RATIO_SLACK >> 20} MiB): a decompression bomb; "
                                  "refusing it before unpacking anything")


def scan_source(source: Source, path: Path, extract_to: Path | None = None, manifest_only: bool = False):
    """Read the archive from the start through ``source`` checking every member against the manifest
    (optionally writing the files under ``extract_to``); return (manifest, sha256 of the bytes read)."""
    source.restart()
    if source.size == 0:
        raise CorruptArchiveError(f"{path}: an empty file, not an sd3plugin cache archive (make one with "
                                  "`sd3plugin-cache pack`)")
    stream = Stream(source, path)
    tar = TarReader(stream, path)
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
    bomb_check(manifest, source, path)
    files = manifest["files"]
    folders = manifest_folders(files, path)
    overhead = (len(files) + len(folders) + 2) * (MAX_EXTENDED_HEADERS * (MAX_HEADER_BYTES + BLOCK) + 2 * BLOCK)
    stream.limit = min(stream.pos + manifest["total_bytes"] + overhead + MAX_TRAILING,
                       MAX_RATIO * source.size + RATIO_SLACK)
    seen: set[str] = set()
    dirs_seen: set[str] = set()
    while (m := tar.next()) is not None:
        rel = check_member_name(m.name.rstrip("/") if m.isdir else m.name)
        check_member_type(m)
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
    with Source(path) as src:
        return scan_source(src, path, manifest_only=True)[0]


def scan(path: str | Path) -> dict:
    """Read the whole archive, checking every member against the manifest; write nothing."""
    path = Path(path).expanduser()
    with Source(path) as src:
        return scan_source(src, path)[0]


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
            with Source(path) as src:
                signing.check(path, sig, src.hash_all(), keys)
            out["verified"] = True
    except CacheError as exc:
        out["verified"], out["error"] = False, str(exc)
    return out
