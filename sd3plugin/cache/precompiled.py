"""Precompiled transformer blocks in a cache entry: files, their index and the checks before loading.

    entries/<fingerprint>/precompiled/
      index.json          format, environment, one record per artefact (file, sha256, size, what it covers)
      block-<sha12>.pt2   one precompiled block function (``sd3plugin.compat.precompile``), as torch wrote it

They live inside the entry, so ``pack`` carries them (the archive manifest lists every file with its
sha256) and ``install`` replaces them with the entry. ``usable(root, fp)`` says which artefacts this process
may load and why the others may not: a file whose sha256 differs from the index (damaged, truncated), or an
environment that differs in any of ``MATCH`` (the artefacts hold bytecode and compiled kernels: unlike the
inductor cache they are not merely missed on a mismatch). ``warm`` rebuilds what is missing or unusable.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from . import store

FORMAT = "sd3plugin-precompiled/1"
FOLDER = store.PRECOMPILED
INDEX = "index.json"
SUFFIX = ".pt2"
# Everything that must be equal for an artefact to load (bytecode of diffusers' and sd3plugin's code is in it).
MATCH = ("torch", "triton", "python_full", "machine", "cuda", "gpu", "gpu_capability", "diffusers", "sd3plugin")


def folder(root: str | Path, fp: str) -> Path:
    return store.entry_dir(Path(root), fp) / FOLDER


def read_index(root: str | Path, fp: str) -> dict | None:
    index = store.read_json(folder(root, fp) / INDEX)
    return index if isinstance(index, dict) and index.get("format") == FORMAT else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def environment_mismatch(recorded: dict, here: dict) -> list[str]:
    return [f"{k} {recorded.get(k)} (artefacts) vs {here.get(k)} (here)" for k in MATCH if recorded.get(k) != here.get(k)]


def usable(root: str | Path, fp: str, here: dict) -> tuple[list[tuple[dict, bytes]], list[dict], str | None]:
    """(records with their bytes that may be loaded, [{"file", "reason"}] of those that may not, a reason
    when none can be: no entry, no index, another environment)."""
    index = read_index(root, fp)
    if index is None:
        what = "no cache entry" if not store.entry_dir(Path(root), fp).is_dir() else "the entry has no precompiled blocks"
        return [], [], f"{what} for fingerprint {fp} in {root} (run `sd3plugin-cache warm` with this torch)"
    mismatch = environment_mismatch(index.get("environment", {}), here)
    if mismatch:
        return [], [], "precompiled for another environment: " + "; ".join(mismatch)
    ok, bad = [], []
    for record in index.get("artefacts", []):
        name = record.get("file") if isinstance(record, dict) else None
        if not store.safe_name(name) or not name.endswith(SUFFIX):  # read from the cache dir: never a path
            bad.append({"file": str(name), "reason": "not a file name of the precompiled folder; not read"})
            continue
        path = folder(root, fp) / name
        try:
            data = store.read_regular(path)  # not a link, not a FIFO
        except OSError as exc:
            bad.append({"file": record["file"], "reason": f"cannot read it: {exc.strerror}"})
            continue
        if len(data) != record.get("size") or sha256(data) != record.get("sha256"):
            bad.append({"file": record["file"], "reason": f"sha256 mismatch ({len(data)} bytes, index says "
                                                          f"{record.get('size')}): damaged or truncated"})
            continue
        ok.append((record, data))
    return ok, bad, None if ok else ("every precompiled block is unusable" if bad else "the index lists none")


def write(root: str | Path, fp: str, new: list[tuple[dict, bytes]], keep: list[dict], env: dict) -> dict:
    """Store ``new`` artefacts (record, bytes) beside the ``keep`` records of the index; drop the rest.
    Call with the cache lock held. Returns the index written."""
    d = folder(root, fp)
    records = []
    for record, data in new:
        digest = sha256(data)
        name = f"block-{digest[:12]}{SUFFIX}"
        store.atomic_write(d / name, data)
        records.append({**record, "file": name, "sha256": digest, "size": len(data), "created": _now()})
    records += [r for r in keep if r["file"] not in {x["file"] for x in records}]
    index = {"format": FORMAT, "environment": {k: env.get(k) for k in sorted(set(MATCH) | set(env))},
             "artefacts": records, "updated": _now()}
    store.write_json(d / INDEX, index)
    for stale in d.glob(f"*{SUFFIX}"):
        if stale.name not in {r["file"] for r in records}:
            stale.unlink(missing_ok=True)
    meta = store.read_json(store.entry_dir(Path(root), fp) / store.ENTRY_FILE)
    if meta is not None:  # a summary for `ls` / `info`; the index is the truth
        meta["precompiled"] = {"artefacts": len(records), "size_bytes": sum(r["size"] for r in records),
                               "torch": env.get("torch"), "updated": index["updated"]}
        store.write_json(store.entry_dir(Path(root), fp) / store.ENTRY_FILE, meta)
    return index


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
