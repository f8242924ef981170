"""Check, before anything loads, that the folders and files a command will write can be written.

A read-only mount, a folder without permission or a file where a folder should be ends in one
``NotWritableError`` naming the path and the fix (exit code 8, ``cannot_write``), instead of a traceback
after minutes of loading and generating. The check writes and removes a probe file: permission bits say
nothing to root, a read-only mount says no to everyone.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import NotWritableError


def describe_error(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "is not writable (permission denied)"
    if exc.errno == errno.ENOSPC:
        return "has no space left"
    return f"cannot be written ({exc.strerror or exc})"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _probe(folder: Path) -> OSError | None:
    """Write and remove a file in the existing ``folder``: None if that works, else the error."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sd3plugin-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def check_folder(path, what: str, fix: str) -> Path:
    """Raise NotWritableError unless folder ``path`` exists and can be written, or can be created; the
    folder itself is not created. Returns the absolute path."""
    folder = Path(os.path.expanduser(str(path))).absolute()
    base = nearest_existing(folder)
    if not base.is_dir():
        raise NotWritableError(f"cannot write {what} {folder}: {base} is a file, not a folder; {fix}")
    exc = _probe(base)
    if exc is not None:
        why = describe_error(exc)
        detail = f"it {why}" if base == folder else f"it cannot be created: {base} {why}"
        raise NotWritableError(f"cannot write {what} {folder}: {detail}; {fix}")
    return folder


def check_file(path, what: str, fix: str) -> Path:
    """Raise NotWritableError unless file ``path`` can be written (its folder can be, and it is no folder)."""
    target = Path(os.path.expanduser(str(path))).absolute()
    if target.is_dir():
        raise NotWritableError(f"cannot write {what} {target}: it is a folder; {fix}")
    base = nearest_existing(target.parent)
    if not base.is_dir():
        raise NotWritableError(f"cannot write {what} {target}: {base} is a file, not a folder; {fix}")
    exc = _probe(base)
    if exc is not None:
        raise NotWritableError(f"cannot write {what} {target}: {base} {describe_error(exc)}; {fix}")
    return target


def check_run_outputs(cfg, run_folder=None, image: bool = True) -> None:
    """What sd3plugin-run / sd3plugin-bench write: ``output_dir`` (or the run folder), ``image_path``, and
    ``cache_dir`` (compile caches, random-weight models)."""
    if cfg.get("output_dir"):
        check_folder(cfg.output_dir, "output_dir", "set output_dir=PATH to a folder you can write")
    elif run_folder is not None:
        check_folder(run_folder, "the run folder", "run from a folder you can write or set output_dir=PATH")
    if image and cfg.get("image_path"):
        check_file(cfg.image_path, "the image (--saved-image / image_path)",
                   "name a file in a folder you can write")
    check_folder(cfg.cache_dir, "cache_dir", "set cache_dir=PATH (or SD3PLUGIN_CACHE_DIR) to a folder you "
                 "can write")
