"""One lock per cache dir (``<cache_dir>/.lock``) for warm, install, pack, prune and clear.

Whoever takes the lock first finishes what an interrupted command left (``store.recover``: an install
killed while it moved files is rolled back, staging folders and temporary files are removed) and removes
files damaged, replaced or deleted (``store.check_files`` / ``store.repair``: by content, see
``cache/checksums.py``). Readers that do not need the lock
(``activate``, ``ls``, ``verify``) do the same through ``maintain`` when the lock is free.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import CacheLockedError, CacheWriteError

LOCK_NAME = ".lock"
DEFAULT_TIMEOUT_S = 3600.0  # a concurrent warm may compile for many minutes
log = logging.getLogger("sd3plugin")


@contextmanager
def cache_lock(root: str | Path, timeout: float = DEFAULT_TIMEOUT_S, what: str = "use", maintain: bool = True):
    """Hold the cache dir's lock (creating the dir); ``CacheLockedError`` after ``timeout`` seconds.

    With ``maintain`` (the default) interrupted commands are recovered and damaged files removed first;
    what was done is in the ``maintenance`` attribute of the yielded object.
    """
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
    held = _Held()
    try:
        if maintain:
            held.maintenance = _maintain_locked(root)
        yield held
    finally:
        lock.release()


class _Held:
    def __init__(self):
        self.maintenance = {"recovered": [], "repaired": []}


def _maintain_locked(root: Path, full: bool = False) -> dict:
    from . import store

    try:
        recovered = store.recover(root)
        repaired = store.repair(root, store.check_files(root, full=full, update=True))
        if full:  # files torch wrote since the last record (a server that compiled) get one now
            store.refresh_checksums(root)
    except OSError as exc:
        raise CacheWriteError(f"cannot repair cache dir {str(root)!r} after an interrupted command: "
                              f"{exc.strerror}; check its permissions and free space") from None
    for line in recovered:
        log.warning("sd3plugin: cache dir %s: %s", root, line)
    for item in repaired:
        log.warning("sd3plugin: cache file %s was damaged (%s): %s", item["file"], item["problem"], item["action"])
    return {"recovered": recovered, "repaired": repaired}


def maintain(root: str | Path, full: bool = False, timeout: float = 0.0) -> dict:
    """Recover interrupted commands and remove damaged files if the lock can be had within ``timeout``
    (a live install or warm holds it: then nothing is touched). ``full`` hashes every recorded file."""
    from . import store

    root = Path(root)
    result = {"recovered": [], "repaired": [], "skipped": None}
    if not root.is_dir() or not ((root / store.CHECKSUMS).exists() or (root / store.INSTALLED).exists()
                                 or store.leftovers(root)):
        return result
    lock = FileLock(str(root / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        result["skipped"] = "the cache dir is locked by another process (an install or warm in progress)"
        return result
    except OSError as exc:
        result["skipped"] = f"cannot lock the cache dir: {exc.strerror}"
        return result
    try:
        result.update(_maintain_locked(root, full=full))
    except CacheWriteError as exc:
        result["skipped"] = str(exc)
    finally:
        lock.release()
    return result
