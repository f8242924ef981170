"""Opening a file a user names (archive, signature, key, config) without ever blocking.

``open(path)`` on a FIFO waits for a writer, and reading a device may never end. Every such file is
opened with ``O_NONBLOCK`` (which makes opening a FIFO return at once), checked with ``fstat`` on the
open descriptor (so a path swapped after the check is never read) and refused unless it is a regular
file. ``NotRegularFile`` is an ``OSError``: callers that turn ``exc.strerror`` into their one-line error
need nothing more.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """The path is a folder, FIFO, socket or device."""


def kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: str | Path) -> tuple[int, os.stat_result]:
    """A blocking descriptor of the regular file at ``path`` and its ``fstat``; OSError (NotRegularFile
    for folders, FIFOs, sockets and devices) otherwise. The caller closes the descriptor."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"is {kind(st.st_mode)}, not a regular file", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str | Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file at ``path`` (so the caller can tell "too large")."""
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit + 1)
