"""Entries of a cache dir: ``entries/<fingerprint>/`` with ``entry.json`` and its Mega-Cache blobs.

``entry.json`` holds the compile config, its fingerprint, the shapes warmed, the environment and the
list of blobs. The folder's name is the entry's fingerprint: a different ``fingerprint`` inside
``entry.json`` is ignored (kept as ``recorded_fingerprint``), entry folders that are links are skipped, and
blob names that are not plain ``*.megacache`` file names of the folder are never read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .layout import (BLOB_SUFFIX, ENTRIES, ENTRY_FILE, _now, atomic_write, dir_size, read_json, remove_tree,
                     write_json)


def shape_key(shapes: list[dict]) -> str:
    blob = json.dumps(sorted(shapes, key=lambda s: json.dumps(s, sort_keys=True)), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def entry_dir(root: Path, fp: str) -> Path:
    return Path(root) / ENTRIES / fp


def safe_name(name) -> bool:
    """A plain file or folder name: no separator, not ``.``/``..``, not hidden, no NUL."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and "\0" not in name
            and not name.startswith("."))


def list_entries(root: str | Path) -> list[dict]:
    """Every entry of a cache dir (``entry.json`` contents plus ``path`` and ``size_bytes``)."""
    base = Path(root) / ENTRIES
    out = []
    if not base.is_dir() or base.is_symlink():
        return out
    for d in sorted(base.iterdir()):
        if d.is_symlink() or not d.is_dir() or not safe_name(d.name):
            continue
        meta = read_json(d / ENTRY_FILE)
        if meta is None:
            continue
        if meta.get("fingerprint") != d.name:
            meta["recorded_fingerprint"] = meta.get("fingerprint")
            meta["fingerprint"] = d.name
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
    from .checksums import refresh_checksums

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
    """The entry's blob files: plain ``*.megacache`` names inside its folder, regular files, no links."""
    d = Path(entry["path"])
    blobs = entry.get("blobs")
    names = sorted(n for n in blobs if safe_name(n) and n.endswith(BLOB_SUFFIX)) if isinstance(blobs, dict) else []
    return [d / n for n in names if (d / n).is_file() and not (d / n).is_symlink()]
