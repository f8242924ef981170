"""One lock per cache dir (``<cache_dir>/.lock``) for warm, install, pack, prune and clear."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import CacheLockedError, CacheWriteError

LOCK_NAME = ".lock"
DEFAULT_TIMEOUT_S = 3600.0  # a concurrent warm may compile for many minutes


@contextmanager
def cache_lock(root: str | Path, timeout: float = DEFAULT_TIMEOUT_S, what: str = "use"):
    """Hold the cache dir's lock (creating the dir); ``CacheLockedError`` after ``timeout`` seconds."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheWriteError(f"cannot create cache dir {str(root)!r}: {exc.strerror}; choose a writable "
                              "--cache-dir") from None
    lock = FileLock(str(root / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise CacheLockedError(f"cache dir {str(root)!r} is locked by another sd3plugin-cache process "
                               f"(waited {timeout:g} s to {what} it); wait for it to finish or raise "
                               "--lock-timeout") from None
    except OSError as exc:
        raise CacheWriteError(f"cannot lock cache dir {str(root)!r}: {exc.strerror}; choose a writable "
                              "--cache-dir") from None
    try:
        yield
    finally:
        lock.release()
