"""The layout of a cache dir and its entries.

    <cache_dir>/
      .lock                      one lock for every sd3plugin-cache command
      entries/<fingerprint>/     one entry per config: entry.json + Mega-Cache blobs (*.megacache)
      inductor/                  TORCHINDUCTOR_CACHE_DIR (FX graphs, AOTAutograd, compiled kernels)
      inductor/triton/           TRITON_CACHE_DIR
      installed.json             manifest of the archive last installed here
      models/                    random-weight pipelines (never packed)

``entry.json`` holds the compile config, its fingerprint, the shapes warmed, the environment and the
list of blobs. Every file is written to a temporary name and renamed, so readers never see half a file.
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
ENTRY_FILE = "entry.json"
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
        Path(tmp).unlink(missing_ok=True)
        raise


def default_mode(path) -> None:
    """Give a ``mkstemp`` file the permissions a plain ``open`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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
