"""Journaled installs and the recovery of interrupted commands.

An install moves its staged files into place under a journal (``Transaction``): a failure, or the next
process to take the lock after a SIGKILL (``recover``), puts back exactly what was there before.

A journal is read back from the cache dir, so ``recover`` trusts none of its paths: every target must stay
inside the cache dir under ``entries/``, ``inductor/`` or one of the top-level records, every source and
backup inside its staging folder (``layout.confine``). A journal naming anything else is not followed: the
staging folder is removed (its own files only) and the refusal is reported.
"""
from __future__ import annotations

import os
from pathlib import Path

from .layout import (CHECKSUMS, ENTRIES, INDUCTOR, INSTALL_PREFIX, INSTALLED, JOURNAL, OutsideError, _now,
                     confine, dir_size, human_size, read_json, remove_tree, write_json)

# Where a journal may move things in the cache dir (first part of each target).
TARGETS = (ENTRIES, INDUCTOR, INSTALLED, CHECKSUMS)
SOURCES = ("new", "old")


def leftovers(root: str | Path) -> list[dict]:
    """What interrupted commands left in the cache dir: staging folders of installs and temporary files
    of ``atomic_write`` (removed by the next command that takes the lock). Only names directly in the
    cache dir or in a real entry folder (not behind a link)."""
    root = Path(root)
    out = []
    candidates = list(root.glob(INSTALL_PREFIX + "*")) + list(root.glob(".*.tmp"))
    entries = root / ENTRIES
    if entries.is_dir() and not entries.is_symlink():
        candidates += [p for p in entries.glob("*/.*.tmp") if not p.parent.is_symlink()]
    for p in sorted(candidates):
        try:
            size = dir_size(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_size
        except OSError:
            continue
        journal = read_json(p / JOURNAL) if p.is_dir() and not p.is_symlink() else None
        kind = ("interrupted install (rolled back by the next command)" if journal and journal.get("state") == "moving"
                else "staging folder of an install" if p.name.startswith(INSTALL_PREFIX) else "temporary file")
        out.append({"path": str(p), "bytes": size, "kind": kind})
    return out


class Transaction:
    """Move staged files and folders into the cache dir, all or nothing.

    ``add(src, rel)`` plans one move (``src`` inside the staging folder, ``rel`` its place in the cache
    dir). ``commit()`` writes ``journal.json`` (state ``moving``) into the staging folder, moves each
    existing target aside into ``old/<n>`` and the new one into place, then marks the journal
    ``committed``. On any error it rolls back; a SIGKILL leaves the journal, and ``recover`` (run by every
    process that takes the cache dir's lock) rolls back. Call with the lock held.

    A commit that moves ``checksums.json`` into place records again the inode and ctime of the files it
    moved (a rename changes a file's ctime), so the next check does not hash them all again.
    """

    def __init__(self, root: Path, staging: Path):
        self.root, self.dir = Path(root), Path(staging)
        self.ops: list[list] = []
        self.mkdirs: list[str] = []

    def add(self, src: Path, rel: str) -> None:
        dst = confine(self.root, rel, TARGETS)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in self.mkdirs and not os.path.lexists(self.root / d):
                self.mkdirs.append(d)
        backup = f"old/{len(self.ops)}" if os.path.lexists(dst) else None
        self.ops.append([Path(src).relative_to(self.dir).as_posix(), rel, backup])

    def commit(self) -> None:
        journal = {"state": "moving", "ops": self.ops, "mkdirs": self.mkdirs, "pid": os.getpid(),
                   "started": _now()}
        write_json(self.dir / JOURNAL, journal)
        try:
            (self.dir / "old").mkdir(exist_ok=True)
            for d in self.mkdirs:
                (self.root / d).mkdir(exist_ok=True)
            for src, rel, backup in self.ops:
                dst = self.root / rel
                if backup and os.path.lexists(dst):
                    os.rename(dst, self.dir / backup)
                os.rename(self.dir / src, dst)
            write_json(self.dir / JOURNAL, {**journal, "state": "committed"})
        except BaseException:
            try:
                rollback(self.root, self.dir, journal)
                write_json(self.dir / JOURNAL, {**journal, "state": "rolled back"})
            except Exception:  # leave the journal: the next process to take the lock finishes it
                pass
            raise
        if any(rel == CHECKSUMS for _, rel, _ in self.ops):
            from .checksums import restat_moved

            try:
                restat_moved(self.root, [rel for _, rel, _ in self.ops])
            except OSError:  # the records stay as they were: the next check hashes those files once
                pass


def check_journal(root: Path, staging: Path, journal: dict) -> list[tuple[Path, Path, Path | None]]:
    """The journal's moves as confined paths: [(source, target, backup)]; OutsideError naming the first
    path that is not where it must be (or a journal that is not a list of moves)."""
    ops, mkdirs = journal.get("ops"), journal.get("mkdirs")
    if not isinstance(ops, list) or not isinstance(mkdirs if mkdirs is not None else [], list):
        raise OutsideError("the journal's moves are not a list")
    out = []
    for op in ops:
        if not isinstance(op, list) or len(op) != 3:
            raise OutsideError(f"{op!r} is not a move")
        src, rel, backup = op
        out.append((confine(staging, src, SOURCES), confine(root, rel, TARGETS),
                    confine(staging, backup, SOURCES) if backup is not None else None))
    for d in mkdirs or []:
        confine(root, d, TARGETS)
    return out


def rollback(root: Path, staging: Path, journal: dict) -> None:
    """Undo the moves of ``journal`` (idempotent: safe to run again after another interruption).
    OutsideError, before anything is moved, when the journal names a path it must not."""
    root, staging = Path(root), Path(staging)
    moves = check_journal(root, staging, journal)
    for src_p, dst, backup in reversed(moves):
        if not os.path.lexists(src_p) and os.path.lexists(dst):  # ours is in place: take it back out
            src_p.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dst, src_p)
        if backup is not None and os.path.lexists(backup) and not os.path.lexists(dst):
            os.rename(backup, dst)
    for d in reversed(journal.get("mkdirs") or []):
        try:
            confine(root, d, TARGETS).rmdir()
        except (OSError, OutsideError):
            pass


def recover(root: str | Path) -> list[str]:
    """Finish what interrupted commands left (call with the cache dir's lock held): roll back an install
    killed while it moved files, remove staging folders and temporary files. Returns what was done."""
    root = Path(root)
    done = []
    for item in leftovers(root):
        p = Path(item["path"])
        journal = read_json(p / JOURNAL) if p.is_dir() and not p.is_symlink() else None
        if journal and journal.get("state") == "moving":
            try:
                rollback(root, p, journal)
                done.append(f"rolled back the interrupted install {p.name}")
            except OutsideError as exc:
                done.append(f"refused the journal of {p.name}: {exc}; nothing outside the cache dir was touched, "
                            "the staging folder was removed")
        else:
            done.append(f"removed {p.relative_to(root)} ({human_size(item['bytes'])})")
        remove_tree(p)
    return done
