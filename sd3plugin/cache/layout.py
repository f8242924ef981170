"""The layout of a cache dir: names, atomic writes, JSON files, packable files, and ``confine``.

    <cache_dir>/
      .lock                      one lock for every sd3plugin-cache command
      entries/<fingerprint>/     one entry per config: entry.json + Mega-Cache blobs (*.megacache)
      inductor/                  TORCHINDUCTOR_CACHE_DIR (FX graphs, AOTAutograd, compiled kernels)
      inductor/triton/           TRITON_CACHE_DIR
      installed.json             manifest of the archive last installed here
      checksums.json             size, inode, ctime, mtime and sha256 of every file installed or warmed
      models/                    random-weight pipelines (never packed)
      .install-*/                staging folder of an install (with journal.json while it moves files)

Every file is written to a temporary name and renamed, so readers never see half a file. Every path read
from the cache dir's own metadata (a journal, a checksums record, an entry's blob names) goes through
``confine`` before it is used: anything that could name a place outside the cache dir is refused.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

ENTRIES = "entries"
INDUCTOR = "inductor"
INSTALLED = "installed.json"
CHECKSUMS = "checksums.json"
ENTRY_FILE = "entry.json"
INSTALL_PREFIX = ".install-"
JOURNAL = "journal.json"
BLOB_SUFFIX = ".megacache"
PRECOMPILED = "precompiled"  # entries/<fingerprint>/precompiled/: checked by its own index (cache/precompiled.py)
# What pack ships and install replaces: everything of a cache dir but models/ and the lock.
PACKED_DIRS = (ENTRIES, INDUCTOR)
# Inductor's own lock files and temporary files are not cache content.
SKIP_NAMES = {"locks", ".lock"}


class OutsideError(ValueError):
    """A path read from cache metadata that would leave the folder it must stay in."""


def confine(base: str | Path, rel, tops: tuple[str, ...] | None = None) -> Path:
    """``base / rel`` when ``rel`` is a relative POSIX path that stays inside ``base``; OutsideError if not.

    Refused: anything but a non-empty str, NUL bytes, absolute paths, empty, ``.`` or ``..`` parts, a first
    part not in ``tops`` (when given), and a path whose parent folder resolves (through links) outside
    ``base``. The last part is not resolved: a link there is handled as a link (renamed or unlinked).
    """
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        raise OutsideError(f"{rel!r} is not a relative path")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise OutsideError(f"{rel!r} is not a plain relative path (absolute, empty, '.' or '..' parts)")
    if tops is not None and parts[0] not in tops:
        raise OutsideError(f"{rel!r} is not under {', '.join(t + '/' for t in tops)}")
    base = Path(base)
    path = base.joinpath(*parts)
    real_base = os.path.realpath(base)
    real_parent = os.path.realpath(path.parent)
    if real_parent != real_base and not real_parent.startswith(real_base.rstrip(os.sep) + os.sep):
        raise OutsideError(f"{rel!r} leads outside {str(base)!r} through a link")
    return path


def is_confined(base: str | Path, rel, tops: tuple[str, ...] | None = None) -> bool:
    try:
        confine(base, rel, tops)
        return True
    except OutsideError:
        return False


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        default_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass
        raise


def default_mode(path) -> None:
    """Give a ``mkstemp`` file the permissions a plain ``open`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def open_regular(path: str | Path) -> int:
    """A file descriptor of ``path`` opened for reading when it is a regular file, not a link (OSError if
    not): a link planted in the cache dir is not followed, a FIFO does not block."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file (``open_regular``: no link followed, no FIFO waited on)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable, not a regular file (a link, a
    FIFO) or not a JSON object."""
    try:
        data = json.loads(read_regular(path))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def iter_files(root: Path):
    """(relative posix path, absolute path) of every packable file, sorted; links are skipped."""
    root = Path(root)
    for top in PACKED_DIRS:
        base = root / top
        if not base.is_dir() or base.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES
                                 and not (Path(dirpath) / d).is_symlink())
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if name in SKIP_NAMES or name.endswith((".lock", ".tmp")) or p.is_symlink() or not p.is_file():
                    continue
                yield p.relative_to(root).as_posix(), p


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                pass
    return total


def has_cache(root: Path) -> bool:
    return any((Path(root) / top).exists() for top in PACKED_DIRS) or (Path(root) / INSTALLED).exists()


def remove_tree(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder (links inside are unlinked, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
