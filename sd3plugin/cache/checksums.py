"""``checksums.json``: a record of every file installed or warmed, and the checks that find damage.

Each record holds size, sha256 and the file's identity (inode, ctime, mtime). A file whose identity no
longer matches its record (copied with ``cp -a`` or rsync: another inode; rewritten, even with its mtime
put back: another ctime; an old record without them) is hashed again before use: same content, and only
the identity is recorded again; other content, and it is damaged. ``full`` (``verify``) hashes every
recorded file. A recorded file that is gone is reported as deleted. A ``checksums.json`` that is empty,
unreadable or missing while the cache has files it should record means nothing can be checked: the cache's
files are not used (``repair`` removes them; ``warm`` or ``install`` builds them again).

Record names are read from the cache dir, so each is confined to ``entries/`` or ``inductor/``
(``layout.confine``): a record naming anything else is reported and dropped, never followed.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .layout import (CHECKSUMS, ENTRIES, INSTALLED, PACKED_DIRS, PRECOMPILED, OutsideError, confine, iter_files, open_regular,
                     read_json,
                     remove_tree, write_json)

LOST = CHECKSUMS  # the "file" of the problem reported when the record itself is lost
IDENTITY = ("ino", "ctime_ns", "mtime_ns")


def read_checksums(root: str | Path) -> dict:
    data = read_json(Path(root) / CHECKSUMS)
    files = (data or {}).get("files")
    return files if isinstance(files, dict) else {}


def lost_record(root: str | Path) -> str | None:
    """Why the cache's files cannot be checked (None when they can): ``checksums.json`` is unreadable or
    empty while the cache has packable files, or missing where an install wrote one."""
    root = Path(root)
    path = root / CHECKSUMS
    missing = not path.exists() and not path.is_symlink()
    if missing and not (root / INSTALLED).exists():
        return None  # a cache dir this version never recorded (older versions, torch alone)
    data = None if missing else read_json(path)
    if data is not None and isinstance(data.get("files"), dict):
        return None
    if next(iter_files(root), None) is None:
        return None
    if missing:
        return f"{CHECKSUMS} is missing but {INSTALLED} says an archive was installed"
    try:
        st = path.lstat()
        empty = stat.S_ISREG(st.st_mode) and (st.st_size == 0 or data == {})
    except OSError:
        empty = False
    return f"{CHECKSUMS} is {'empty' if empty else 'unreadable (not a record of files)'}"


def file_record(path: Path, sha256: str | None = None) -> dict:
    st = path.stat()
    if sha256 is None:
        sha256 = sha256_file(path)
    return {"size": st.st_size, "sha256": sha256, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def same_identity(rec: dict, st) -> bool:
    return (rec.get("size") == st.st_size and rec.get("ino") == st.st_ino and rec.get("ctime_ns") == st.st_ctime_ns
            and rec.get("mtime_ns") == st.st_mtime_ns)


def refresh_checksums(root: str | Path) -> None:
    """Record every packable file (hashing those new or changed since recorded). Call with the lock held
    and after ``check_files``/``repair``: a changed file is recorded with its new content."""
    root = Path(root)
    old = read_checksums(root)
    new = {}
    for rel, path in iter_files(root):
        try:
            rec = old.get(rel)
            new[rel] = rec if isinstance(rec, dict) and same_identity(rec, path.stat()) else file_record(path)
        except OSError:
            continue
    write_json(root / CHECKSUMS, {"format": 1, "files": new})


def restat_moved(root: str | Path, rels: list[str]) -> None:
    """Record the new ctime of files just renamed into place (same inode, size and mtime as recorded)."""
    root = Path(root)
    records = read_checksums(root)
    changed = False
    for rel, rec in records.items():
        if not isinstance(rec, dict) or not any(rel == r or rel.startswith(r + "/") for r in rels):
            continue
        try:
            st = confine(root, rel, PACKED_DIRS).lstat()
        except (OSError, OutsideError):
            continue
        if (stat.S_ISREG(st.st_mode) and rec.get("ino") == st.st_ino and rec.get("size") == st.st_size
                and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("ctime_ns") != st.st_ctime_ns):
            rec["ctime_ns"] = st.st_ctime_ns
            changed = True
    if changed:
        write_json(root / CHECKSUMS, {"format": 1, "files": records})


def forget_checksums(root: str | Path, prefixes: list[str]) -> None:
    """Drop the records of files under ``prefixes`` (removed entries). Call with the lock held."""
    root = Path(root)
    if not prefixes or not (root / CHECKSUMS).exists():
        return
    records = read_checksums(root)
    keep = {r: v for r, v in records.items() if not any(r == p or r.startswith(p + "/") for p in prefixes)}
    if len(keep) != len(records):
        write_json(root / CHECKSUMS, {"format": 1, "files": keep})


def check_files(root: str | Path, full: bool = False, update: bool = False) -> list[dict]:
    """Recorded files that are damaged, deleted or out of bounds: [{"file", "problem"}].

    Hashes a file whose identity differs from its record (``full``: every file). ``update`` (with the lock
    held) records the new identity of files whose content still matches, so they are hashed once.
    """
    root = Path(root)
    lost = lost_record(root)
    if lost:
        return [{"file": LOST, "problem": f"{lost}: no file of the cache can be checked"}]
    records = read_checksums(root)
    bad, changed = [], False
    for rel, rec in records.items():
        try:
            path = confine(root, rel, PACKED_DIRS)
        except OutsideError as exc:
            bad.append({"file": rel, "problem": f"the record names a path outside entries/ and inductor/ ({exc})"})
            continue
        if not isinstance(rec, dict):
            bad.append({"file": rel, "problem": "its record is not readable"})
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            bad.append({"file": rel, "problem": "deleted"})
            continue
        except OSError as exc:
            bad.append({"file": rel, "problem": f"cannot read it: {exc.strerror}"})
            continue
        try:
            if not stat.S_ISREG(st.st_mode):
                bad.append({"file": rel, "problem": "replaced by a link or a folder"})
            elif st.st_size != rec.get("size"):
                bad.append({"file": rel, "problem": f"{st.st_size} bytes instead of {rec.get('size')}"})
            elif full or not same_identity(rec, st):
                if sha256_file(path) != rec.get("sha256"):
                    bad.append({"file": rel, "problem": "content changed (sha256 mismatch)"})
                elif not same_identity(rec, st):
                    rec.update(ino=st.st_ino, ctime_ns=st.st_ctime_ns, mtime_ns=st.st_mtime_ns)
                    changed = True
        except OSError as exc:
            bad.append({"file": rel, "problem": f"cannot read it: {exc.strerror}"})
    if update and changed:
        write_json(root / CHECKSUMS, {"format": 1, "files": records})
    return bad


def repair(root: str | Path, bad: list[dict]) -> list[dict]:
    """Act on what ``check_files`` found, inside the cache dir only: remove a damaged inductor file alone
    (torch writes it again or compiles it again), the whole entry of a damaged or deleted entry file
    (``warm`` builds it again) but for precompiled blocks (``cache/precompiled.py`` checks each against its
    index as it loads it, falls back for that block alone, and ``warm`` rebuilds it), every cache file when the record is lost; drop records of deleted files and
    records naming paths outside. Updates checksums.json. Call with the lock held."""
    root = Path(root)
    if not bad:
        return []
    if any(item["file"] == LOST for item in bad):
        return [_remove_unchecked(root, item) for item in bad]
    records = read_checksums(root)
    done = []
    for item in bad:
        rel, problem = item["file"], item["problem"]
        try:
            confine(root, rel, PACKED_DIRS)
        except OutsideError:
            records.pop(rel, None)
            done.append({**item, "action": "record dropped; nothing outside the cache dir was touched"})
            continue
        parts = rel.split("/")
        if parts[0] == ENTRIES and len(parts) >= 4 and parts[2] == PRECOMPILED:
            records.pop(rel, None)  # its index holds each block's sha256, checked as it is loaded
            done.append({**item, "action": "left to the precompiled index check (not loaded; the next warm "
                                           "rebuilds it)"})
            continue
        if parts[0] == ENTRIES and len(parts) >= 3:
            target, action = "/".join(parts[:2]), f"removed entry {parts[1]} (warm it again)"
        elif problem == "deleted":
            target, action = rel, "record dropped (compiled again at the next run)"
        else:
            target, action = rel, "removed (compiled again at the next run)"
        try:
            remove_tree(root / target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            action = f"could not remove it: {exc.strerror}"
        for r in [r for r in records if r == target or r.startswith(target + "/")]:
            records.pop(r, None)
        done.append({**item, "action": action})
    write_json(root / CHECKSUMS, {"format": 1, "files": records})
    return done


def _remove_unchecked(root: Path, item: dict) -> dict:
    removed = []
    for top in PACKED_DIRS:
        if (root / top).exists() or (root / top).is_symlink():
            remove_tree(root / top)
            removed.append(top + "/")
    write_json(root / CHECKSUMS, {"format": 1, "files": {}})
    return {**item, "action": f"removed {' and '.join(removed) or 'nothing'} (install the archive again or warm)"}
