"""PyTorch's Mega-Cache: save the artefacts a process compiled, hot-load them in another one.

``load_entries(root)`` loads every compatible entry blob of a cache dir once per process (it writes
the artefacts into the inductor/Triton dirs that ``activate`` chose). ``compile_counters()`` reads
dynamo's counters: FX-graph cache misses are fresh compilations.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import store
from .manifest import compatibility, environment

log = logging.getLogger("sd3plugin")
_LOADED: dict[str, tuple[int, int]] = {}  # blob path -> (size, mtime_ns) already loaded in this process


def available() -> bool:
    """Whether this torch has the Mega-Cache API (torch >= 2.7; the nexfort stack's torch 2.4 has not)."""
    import torch

    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def load_entries(root: str | Path) -> dict:
    """Hot-load the Mega-Cache blobs under ``root/entries`` not loaded yet; report what happened."""
    entries = store.list_entries(root)
    result = {"loaded": [], "skipped": [], "artifacts": {}, "seconds": 0.0}
    if not entries or not any(e.get("blobs") for e in entries):
        return result
    import torch

    here = environment()
    guard = _checksum_guard(Path(root))
    started = time.perf_counter()
    for entry in entries:
        errors, _ = compatibility(entry.get("environment", {}), here, entry.get("config", {}).get("device"))
        if not errors and not available():
            errors = [f"torch {torch.__version__} has no Mega-Cache (torch.compiler.load_cache_artifacts); "
                      "the inductor folder still serves"]
        for path in store.blob_paths(entry):
            try:  # an install may be replacing this entry right now
                stat = path.stat()
                ident = (stat.st_size, stat.st_mtime_ns)
                if _LOADED.get(str(path)) == ident:
                    continue
                if errors:
                    result["skipped"].append({"blob": str(path), "reason": "; ".join(errors)})
                    continue
                data = store.read_regular(path)
            except OSError as exc:
                result["skipped"].append({"blob": str(path), "reason": f"cannot read it: {exc.strerror}"})
                continue
            refused = guard(path, data)
            if refused:  # the bytes about to be loaded, hashed: damage found however the file was changed
                result["skipped"].append({"blob": str(path), "reason": refused})
                continue
            with _quiet_torch_cache_log() as failures:
                try:
                    info = torch.compiler.load_cache_artifacts(data)
                except Exception as exc:  # a damaged or foreign blob: skip it, one line, no traceback
                    info, failures[:] = None, [f"{type(exc).__name__}: {exc}"]
            _LOADED[str(path)] = ident
            if info is None:
                why = f" ({failures[-1][:200]})" if failures else ""
                result["skipped"].append({"blob": str(path), "reason": f"torch could not read it{why}"})
                continue
            result["loaded"].append(str(path))
            for kind, keys in info.artifacts.items():
                result["artifacts"][kind] = result["artifacts"].get(kind, 0) + len(keys)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if result["loaded"]:
        log.info("sd3plugin: loaded %d compile-cache blob(s) from %s (%s)", len(result["loaded"]), root,
                 ", ".join(f"{v} {k}" for k, v in result["artifacts"].items()))
    for skipped in result["skipped"][:3]:
        log.warning("sd3plugin: compile cache %s not loaded: %s", skipped["blob"], skipped["reason"])
    if len(result["skipped"]) > 3:
        log.warning("sd3plugin: %d more compile-cache blobs not loaded (see report(pipe)['cache'])",
                    len(result["skipped"]) - 3)
    return result


def _checksum_guard(root: Path):
    """A check of a blob's bytes against ``checksums.json`` (why it may not be loaded, or None). A cache
    dir with no checksums.json at all (torch alone, older versions) is not checked; a lost record refuses
    every blob, a blob without a record or with other content is refused."""
    import hashlib

    lost = store.lost_record(root)
    if not lost and not (root / store.CHECKSUMS).exists():
        return lambda path, data: None
    records = store.read_checksums(root)

    def check(path: Path, data: bytes) -> str | None:
        if lost:
            return f"{lost}: its content cannot be checked (install the archive again or warm)"
        rec = records.get(path.relative_to(root).as_posix())
        if not isinstance(rec, dict):
            return "no checksums record (not installed or warmed here); warm it again"
        if len(data) != rec.get("size") or hashlib.sha256(data).hexdigest() != rec.get("sha256"):
            return "damaged: its content does not match checksums.json (warm it again)"
        return None

    return check


class _quiet_torch_cache_log:
    """Turn torch's Mega-Cache load failures (logged with a traceback) into one line each: yields the
    list of their messages and keeps them off the log."""

    LOGGER = "torch.compiler._cache"

    def __enter__(self):
        self.failures: list[str] = []
        failures = self.failures

        class _Capture(logging.Filter):
            def filter(self, record):
                if record.levelno >= logging.WARNING:
                    exc = record.exc_info[1] if record.exc_info else None
                    failures.append(f"{type(exc).__name__}: {exc}" if exc else record.getMessage())
                    return False
                return True

        self.filter = _Capture()
        self.logger = logging.getLogger(self.LOGGER)
        self.logger.addFilter(self.filter)
        return self.failures

    def __exit__(self, *exc):
        self.logger.removeFilter(self.filter)
        return False


def save_artifacts() -> tuple[bytes, dict] | None:
    """This process's compiled artefacts as one Mega-Cache blob, and their counts by kind (None when
    nothing was recorded or torch has no Mega-Cache)."""
    import torch

    if not available():
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    blob, info = saved
    return blob, {kind: len(keys) for kind, keys in info.artifacts.items()}


def nexfort_graph_entries(inductor_dir: str | Path) -> int:
    """Entries of nexfort's compiled-graph cache (``<inductor dir>/compiledgraph/<key>/entry``)."""
    d = Path(inductor_dir) / "compiledgraph"
    return sum(1 for _ in d.glob("*/entry")) if d.is_dir() else 0


def compile_counters(inductor_dir: str | Path | None = None) -> dict:
    """Cache hits/misses so far in this process (inductor FX graphs, AOTAutograd) and, with
    ``inductor_dir``, the number of nexfort compiled-graph entries on disk.

    ``fresh_compilations`` counts inductor's FX-graph misses and bypasses; nexfort compiles outside
    those counters, so callers add the growth of ``nexfort_graph_entries`` (a new entry is a compile).
    """
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    out = {"fxgraph_cache_miss": int(ind["fxgraph_cache_miss"]),
           "fxgraph_cache_bypass": int(ind["fxgraph_cache_bypass"]),
           "fxgraph_cache_hit": int(ind["fxgraph_cache_hit"]),
           "autograd_cache_miss": int(aot["autograd_cache_miss"]),
           "autograd_cache_hit": int(aot["autograd_cache_hit"]),
           # Triton kernels benchmarked at run time by coordinate-descent tuning (max-optimize): a warm
           # start that still tunes spends seconds here (docs/benchmarks/README.md, warm start).
           "coordesc_tuning_benchmarks": int(ind["coordesc_tuning_bench"]),
           "fresh_compilations": int(ind["fxgraph_cache_miss"]) + int(ind["fxgraph_cache_bypass"])}
    if inductor_dir is not None:
        out["nexfort_graph_entries"] = nexfort_graph_entries(inductor_dir)
    return out


def compiled_between(before: dict, after: dict) -> int:
    """Fresh compilations between two ``compile_counters`` snapshots (inductor and nexfort)."""
    return (after["fresh_compilations"] - before["fresh_compilations"]
            + after.get("nexfort_graph_entries", 0) - before.get("nexfort_graph_entries", 0))
