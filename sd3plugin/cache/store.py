"""The layout of a cache dir and its entries.

    <cache_dir>/
      .lock                      one lock for every sd3plugin-cache command
      entries/<fingerprint>/     one entry per config: entry.json + Mega-Cache blobs (*.megacache)
      inductor/                  TORCHINDUCTOR_CACHE_DIR (FX graphs, AOTAutograd, compiled kernels)
      inductor/triton/           TRITON_CACHE_DIR
      installed.json             manifest of the archive last installed here
      checksums.json             size, inode, mtime and sha256 of every file installed or warmed
      models/                    random-weight pipelines (never packed)
      .install-*/                staging folder of an install (with journal.json while it moves files)

``entry.json`` holds the compile config, its fingerprint, the shapes warmed, the environment and the
list of blobs. Every file is written to a temporary name and renamed, so readers never see half a file.

An install moves its staged files into place under a journal (``Transaction``): a failure, or the next
process to take the lock after a SIGKILL (``recover``), puts back exactly what was there before.
``checksums.json`` lets every process that loads the cache find files damaged in place (``check_files``)
and remove them so that they are compiled again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
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
# What pack ships and install replaces: everything of a cache dir but models/ and the lock.
PACKED_DIRS = (ENTRIES, INDUCTOR)
# Inductor's own lock files and temporary files are not cache content.
SKIP_NAMES = {"locks", ".lock"}


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


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def shape_key(shapes: list[dict]) -> str:
    blob = json.dumps(sorted(shapes, key=lambda s: json.dumps(s, sort_keys=True)), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def entry_dir(root: Path, fp: str) -> Path:
    return Path(root) / ENTRIES / fp


def list_entries(root: str | Path) -> list[dict]:
    """Every entry of a cache dir (``entry.json`` contents plus ``path`` and ``size_bytes``)."""
    base = Path(root) / ENTRIES
    out = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        meta = read_json(d / ENTRY_FILE)
        if meta is None:
            continue
        meta["path"] = str(d)
        meta["size_bytes"] = dir_size(d)
        out.append(meta)
    return out


def find_entries(root: str | Path, prefix: str) -> list[dict]:
    return [e for e in list_entries(root) if e.get("fingerprint", "").startswith(prefix)]


def add_blob(root: Path, fp: str, config: dict, composed: dict, env: dict, shapes: list[dict],
             blob: bytes | None, artifacts: dict, seconds: list) -> Path:
    """Record one warm run in the entry of ``fp`` with its Mega-Cache blob (None: torch has no
    Mega-Cache, the inductor folder alone carries the cache). Call with the cache lock held."""
    d = entry_dir(root, fp)
    name = f"{shape_key(shapes)}{BLOB_SUFFIX}"
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        remove_tree(d)
    if blob is not None:
        atomic_write(d / name, blob)
    meta = read_json(d / ENTRY_FILE) or {"fingerprint": fp, "config": config, "created": _now(),
                                           "shapes": [], "blobs": {}}
    for s in shapes:
        if s not in meta["shapes"]:
            meta["shapes"].append(s)
    if blob is not None:
        meta["blobs"][name] = {"shapes": shapes, "artifacts": artifacts, "warm_seconds": seconds,
                               "size_bytes": len(blob), "created": _now()}
    else:
        meta.setdefault("runs_without_megacache", []).append({"shapes": shapes, "warm_seconds": seconds})
    meta["environment"] = env
    meta["composed_config"] = composed
    meta["updated"] = _now()
    write_json(d / ENTRY_FILE, meta)
    refresh_checksums(root)
    return d / name


def blob_paths(entry: dict) -> list[Path]:
    d = Path(entry["path"])
    return [d / name for name in sorted(entry.get("blobs", {})) if (d / name).is_file()]


def iter_files(root: Path):
    """(relative posix path, absolute path) of every packable file, sorted; links are skipped."""
    root = Path(root)
    for top in PACKED_DIRS:
        base = root / top
        if not base.is_dir():
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


# -- leftovers --------------------------------------------------------------------------------------
def leftovers(root: str | Path) -> list[dict]:
    """What interrupted commands left in the cache dir: staging folders of installs and temporary files
    of ``atomic_write`` (removed by the next command that takes the lock)."""
    root = Path(root)
    out = []
    candidates = list(root.glob(INSTALL_PREFIX + "*")) + list(root.glob(".*.tmp"))
    if (root / ENTRIES).is_dir():
        candidates += list((root / ENTRIES).glob("*/.*.tmp"))
    for p in sorted(candidates):
        try:
            size = dir_size(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_size
        except OSError:
            continue
        journal = read_json(p / JOURNAL) if p.is_dir() else None
        kind = ("interrupted install (rolled back by the next command)" if journal and journal.get("state") == "moving"
                else "staging folder of an install" if p.name.startswith(INSTALL_PREFIX) else "temporary file")
        out.append({"path": str(p), "bytes": size, "kind": kind})
    return out


# -- journaled installs --------------------------------------------------------------------------------
class Transaction:
    """Move staged files and folders into the cache dir, all or nothing.

    ``add(src, rel)`` plans one move (``src`` inside the staging folder, ``rel`` its place in the cache
    dir). ``commit()`` writes ``journal.json`` (state ``moving``) into the staging folder, moves each
    existing target aside into ``old/<n>`` and the new one into place, then marks the journal
    ``committed``. On any error it rolls back; a SIGKILL leaves the journal, and ``recover`` (run by every
    process that takes the cache dir's lock) rolls back. Call with the lock held.
    """

    def __init__(self, root: Path, staging: Path):
        self.root, self.dir = Path(root), Path(staging)
        self.ops: list[list] = []
        self.mkdirs: list[str] = []

    def add(self, src: Path, rel: str) -> None:
        dst = self.root / rel
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


def rollback(root: Path, staging: Path, journal: dict) -> None:
    """Undo the moves of ``journal`` (idempotent: safe to run again after another interruption)."""
    root, staging = Path(root), Path(staging)
    ops = journal.get("ops") or []
    for src, rel, backup in reversed(ops):
        src_p, dst = staging / src, root / rel
        if not os.path.lexists(src_p) and os.path.lexists(dst):  # ours is in place: take it back out
            src_p.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dst, src_p)
        if backup and os.path.lexists(staging / backup) and not os.path.lexists(dst):
            os.rename(staging / backup, dst)
    for d in reversed(journal.get("mkdirs") or []):
        try:
            (root / d).rmdir()
        except OSError:
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
            rollback(root, p, journal)
            done.append(f"rolled back the interrupted install {p.name}")
        else:
            done.append(f"removed {p.relative_to(root)} ({human_size(item['bytes'])})")
        remove_tree(p)
    return done


# -- checksums of the installed / warmed files ----------------------------------------------------------
def read_checksums(root: str | Path) -> dict:
    data = read_json(Path(root) / CHECKSUMS)
    files = (data or {}).get("files")
    return files if isinstance(files, dict) else {}


def file_record(path: Path, sha256: str | None = None) -> dict:
    st = path.stat()
    if sha256 is None:
        sha256 = sha256_file(path)
    return {"size": st.st_size, "sha256": sha256, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def refresh_checksums(root: str | Path) -> None:
    """Record every packable file (hashing those new or changed since recorded). Call with the lock held."""
    root = Path(root)
    old = read_checksums(root)
    new = {}
    for rel, path in iter_files(root):
        try:
            st = path.stat()
            rec = old.get(rel)
            if (isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
                    and rec.get("ino") == st.st_ino):
                new[rel] = rec
            else:
                new[rel] = file_record(path)
        except OSError:
            continue
    write_json(root / CHECKSUMS, {"format": 1, "files": new})


def forget_checksums(root: str | Path, prefixes: list[str]) -> None:
    """Drop the records of files under ``prefixes`` (removed entries). Call with the lock held."""
    root = Path(root)
    if not prefixes or not (root / CHECKSUMS).exists():
        return
    records = read_checksums(root)
    keep = {r: v for r, v in records.items() if not any(r == p or r.startswith(p + "/") for p in prefixes)}
    if len(keep) != len(records):
        write_json(root / CHECKSUMS, {"format": 1, "files": keep})


def check_files(root: str | Path, full: bool = False) -> list[dict]:
    """Recorded files damaged in place: [{"file", "problem"}].

    torch writes its cache files by renaming a new file into place, so a recorded file with the same
    inode but another size or content was damaged (a disk error, a cut copy, an editor). A file replaced
    by a new one (another inode) was rewritten by torch and is left alone. Checks size and mtime, and the
    sha256 where the mtime changed (``full``: always).
    """
    root = Path(root)
    bad = []
    for rel, rec in read_checksums(root).items():
        if not isinstance(rec, dict):
            continue
        path = root / rel
        try:
            st = path.lstat()
            if not _stat_is_file(st) or st.st_ino != rec.get("ino"):
                continue
            if st.st_size != rec.get("size"):
                bad.append({"file": rel, "problem": f"{st.st_size} bytes instead of {rec.get('size')}"})
            elif (full or st.st_mtime_ns != rec.get("mtime_ns")) and sha256_file(path) != rec.get("sha256"):
                bad.append({"file": rel, "problem": "content changed (sha256 mismatch)"})
        except OSError:
            continue
    return bad


def repair(root: str | Path, bad: list[dict]) -> list[dict]:
    """Remove damaged files so that they are compiled again: an inductor file alone (torch writes it
    again from its cache entry or compiles it again), the whole entry of a damaged entry file (``warm``
    builds it again). Updates checksums.json. Call with the lock held."""
    root = Path(root)
    if not bad:
        return []
    records = read_checksums(root)
    done = []
    for item in bad:
        rel = item["file"]
        parts = rel.split("/")
        if parts[0] == ENTRIES and len(parts) >= 3:
            target, action = "/".join(parts[:2]), f"removed entry {parts[1]} (warm it again)"
        else:
            target, action = rel, "removed (compiled again at the next run)"
        try:
            remove_tree(root / target)
        except OSError as exc:
            action = f"could not remove it: {exc.strerror}"
        for r in [r for r in records if r == target or r.startswith(target + "/")]:
            records.pop(r, None)
        done.append({**item, "action": action})
    write_json(root / CHECKSUMS, {"format": 1, "files": records})
    return done


def _stat_is_file(st) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)
