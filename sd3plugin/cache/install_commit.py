"""The commit of an install: every move planned and checked for clashes first, the entries' local work
(blobs, shapes, precompiled blocks a ``warm`` added) merged into the staged entries, then everything
moved into place under the journal (``store.Transaction``): all or nothing, even against SIGKILL."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from . import precompiled, store
from .errors import CacheWriteError
from .manifest import compatibility


def _check_place(root: Path, rel: str, folder: bool) -> None:
    """CacheWriteError when the cache dir has a file (or link) where ``rel`` needs a folder, or the reverse."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        p = root.joinpath(*parts[:i])
        if os.path.lexists(p) and (p.is_symlink() or not p.is_dir()):
            raise CacheWriteError(f"cannot install {rel}: {p} in the cache dir is a file or a link where the archive "
                                  "has a folder; remove it (`sd3plugin-cache clear`) or choose another --cache-dir "
                                  "(the cache is as it was)")
    p = root / rel
    if os.path.lexists(p) and (folder != (p.is_dir() and not p.is_symlink())):
        have, want = ("a file or a link", "a folder") if folder else ("a folder", "a file")
        raise CacheWriteError(f"cannot install {rel}: the cache dir has {have} there, the archive {want}; remove "
                              "it (`sd3plugin-cache clear`) or choose another --cache-dir (the cache is as it was)")


def _same_file(path: Path, info: dict) -> bool:
    try:
        st = path.lstat()
        return stat.S_ISREG(st.st_mode) and st.st_size == info["size"] and store.sha256_file(path) == info["sha256"]
    except OSError:
        return False


def commit(staging: Path, root: Path, manifest: dict, record: dict) -> tuple[list[str], list[str]]:
    """Plan every move (checking for clashes first), merge local blobs into replaced entries, then move
    everything into place under the journal."""
    new = staging / "new"
    files = manifest["files"]
    txn = store.Transaction(root, staging)
    records = store.read_checksums(root)
    for rel in sorted(files):
        _check_place(root, rel if not rel.startswith(store.ENTRIES + "/") else "/".join(rel.split("/")[:2]),
                     folder=rel.startswith(store.ENTRIES + "/"))
    for name in (store.INSTALLED, store.CHECKSUMS):
        _check_place(root, name, folder=False)
    for rel in sorted(r for r in files if r.startswith(store.INDUCTOR + "/")):
        if _same_file(root / rel, files[rel]):  # content-addressed and identical: leave it as it is
            records[rel] = store.file_record(root / rel, files[rel]["sha256"])
            continue
        txn.add(new / rel, rel)
        records[rel] = store.file_record(new / rel, files[rel]["sha256"])
    replaced, kept = [], []
    entries = {e["fingerprint"]: e for e in manifest.get("entries", [])}
    for fp in sorted(entries):
        rel = f"{store.ENTRIES}/{fp}"
        dst = root / rel
        for r in [r for r in records if r.startswith(rel + "/")]:
            records.pop(r)
        if dst.is_dir() and not dst.is_symlink():
            replaced.append(fp)
            kept += [f"{fp}/{n}" for n in _merge_entry(dst, new / rel, entries[fp])]
        for p in sorted((new / rel).rglob("*")):  # the entry's files, its precompiled/ folder's too
            if not p.is_file():
                continue
            name = p.relative_to(new / rel).as_posix()
            known = files.get(f"{rel}/{name}")
            records[f"{rel}/{name}"] = store.file_record(
                p, known["sha256"] if known and name not in _MERGED_FILES else None)
        txn.add(new / rel, rel)
    history = (store.read_json(root / store.INSTALLED) or {}).get("history", [])
    history = history if isinstance(history, list) else []
    record["history"] = history[-9:] + [{k: record[k] for k in ("archive", "archive_sha256", "installed")}]
    store.write_json(new / store.INSTALLED, record)
    txn.add(new / store.INSTALLED, store.INSTALLED)
    store.write_json(new / store.CHECKSUMS, {"format": 1, "files": records})
    txn.add(new / store.CHECKSUMS, store.CHECKSUMS)
    txn.commit()
    return replaced, kept


# files of an entry that _merge_entry may rewrite: their checksum is taken from the staged file
_MERGED_FILES = (store.ENTRY_FILE, f"{precompiled.FOLDER}/{precompiled.INDEX}")


def _merge_entry(old: Path, new: Path, entry: dict) -> list[str]:
    """Keep what the cache's entry has and the archive's lacks (blobs of shapes and precompiled blocks a
    local ``warm`` added): link them into the staged entry and merge its entry.json and block index. Only when both were built for the same
    environment. Returns the names kept."""
    old_meta = store.read_json(old / store.ENTRY_FILE) or {}
    new_meta = store.read_json(new / store.ENTRY_FILE)
    if new_meta is None or not isinstance(old_meta.get("environment"), dict):
        return []
    errors, _ = compatibility(old_meta["environment"], entry.get("environment") or {},
                              (entry.get("config") or {}).get("device"))
    if errors:
        return []
    old_blobs = old_meta.get("blobs") if isinstance(old_meta.get("blobs"), dict) else {}
    if not isinstance(new_meta.get("blobs"), dict):
        new_meta["blobs"] = {}
    kept = []
    for name, info in sorted(old_blobs.items()):
        src, dst = old / name, new / name
        if (not isinstance(name, str) or not name.endswith(store.BLOB_SUFFIX) or "/" in name or name.startswith(".")
                or os.path.lexists(dst) or not src.is_file() or src.is_symlink()):
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        new_meta["blobs"][name] = info
        kept.append(name)
    shapes = new_meta.get("shapes") if isinstance(new_meta.get("shapes"), list) else []
    old_shapes = old_meta.get("shapes") if isinstance(old_meta.get("shapes"), list) else []
    added = [s for s in old_shapes if s not in shapes]
    blocks = _merge_precompiled(old / precompiled.FOLDER, new / precompiled.FOLDER, new_meta,
                                entry.get("environment") or {})
    if kept or added or blocks:
        new_meta["shapes"] = shapes + added
        store.write_json(new / store.ENTRY_FILE, new_meta)
    return kept + blocks


def _merge_precompiled(old: Path, new: Path, new_meta: dict, archive_env: dict) -> list[str]:
    """Keep the precompiled blocks the cache's entry has for inputs (``key``) the archive's lacks (what a
    ``warm`` built while the install was checking the archive, or earlier), as shapes are merged: only
    blocks whose bytes match their index record, of the environment of the archive's blocks. Links them
    into the staged ``precompiled/`` folder, merges its index and the entry's summary; returns the names."""
    old_index = store.read_json(old / precompiled.INDEX)
    if (old.is_symlink() or not isinstance(old_index, dict) or old_index.get("format") != precompiled.FORMAT
            or not isinstance(old_index.get("artefacts"), list)):
        return []
    new_index = store.read_json(new / precompiled.INDEX)
    if isinstance(new_index, dict) and new_index.get("format") == precompiled.FORMAT:
        target_env = new_index.get("environment") if isinstance(new_index.get("environment"), dict) else {}
        records = [r for r in new_index.get("artefacts") or [] if isinstance(r, dict)]
    else:
        target_env, records = archive_env, []
        new_index = {k: v for k, v in old_index.items() if k != "artefacts"}
    old_env = old_index.get("environment") if isinstance(old_index.get("environment"), dict) else {}
    if precompiled.environment_mismatch(old_env, target_env):
        return []  # blocks of another torch / diffusers / sd3plugin would not load: warm rebuilds them
    keys, names, kept = {r.get("key") for r in records}, {r.get("file") for r in records}, []
    for record in old_index["artefacts"]:
        name = record.get("file") if isinstance(record, dict) else None
        if (not isinstance(name, str) or "/" in name or name.startswith(".") or not name.endswith(precompiled.SUFFIX)
                or record.get("key") in keys or name in names):
            continue
        src = old / name
        try:
            if src.is_symlink() or not src.is_file() or store.sha256_file(src) != record.get("sha256"):
                continue  # damaged or replaced: not carried over
            new.mkdir(exist_ok=True)
            try:
                os.link(src, new / name)
            except OSError:
                shutil.copy2(src, new / name)
        except OSError:
            continue
        records.append(record)
        keys.add(record.get("key"))
        names.add(name)
        kept.append(f"{precompiled.FOLDER}/{name}")
    if kept:
        new_index["artefacts"] = records
        store.write_json(new / precompiled.INDEX, new_index)
        new_meta["precompiled"] = {**(new_meta.get("precompiled") if isinstance(new_meta.get("precompiled"), dict)
                                      else {}),
                                   "artefacts": len(records), "size_bytes": sum(r.get("size") or 0 for r in records)}
    return kept
