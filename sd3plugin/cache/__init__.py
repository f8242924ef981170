"""Compile caches: where they live (``cache_dir``), how a process uses them, how they are shipped.

``activate(cache_dir)`` (called by ``optimize()`` before compiling) points inductor's and Triton's
on-disk caches at ``cache_dir`` and hot-loads the Mega-Cache entries warmed or installed there (once
per process). ``sd3plugin-cache`` (``cli/``) warms, packs, installs and verifies them; see docs/cache.md.
"""
from __future__ import annotations

from pathlib import Path

from ..global_settings import GLOBAL_SETTINGS
from . import store


def cache_paths(cache_dir: str | Path) -> dict[str, Path]:
    root = Path(cache_dir).expanduser()
    return {"root": root, "inductor": root / store.INDUCTOR, "triton": root / store.INDUCTOR / "triton",
            "models": root / "models", "entries": root / store.ENTRIES, "installed": root / store.INSTALLED}


def _point_inductor_at(inductor_dir: Path) -> None:
    """Set TORCHINDUCTOR_CACHE_DIR. torch < 2.5 memoizes paths under the old dir (``cpp_prefix_path``):
    a change of dir there also clears inductor's in-memory caches, or later C++ kernels include a header
    from a folder that may be gone."""
    import os

    import torch

    changed = os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(inductor_dir)
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    if changed and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        from torch._inductor.utils import clear_inductor_caches

        clear_inductor_caches()


def activate(cache_dir: str | Path, keep_coordesc: bool | None = None) -> dict:
    """Point inductor's and Triton's caches at ``cache_dir`` and load its Mega-Cache entries.

    Returns what was set and loaded (it goes into ``report(pipe)["cache"]``). Cheap when nothing is
    installed: no entry, no torch.compiler call.
    """
    paths = cache_paths(cache_dir)
    paths["inductor"].mkdir(parents=True, exist_ok=True)
    _point_inductor_at(paths["inductor"])
    GLOBAL_SETTINGS.set_env("TRITON_CACHE_DIR", str(paths["triton"]))
    # On by default in current torch; torch 2.4 (the nexfort stack) keeps FX graphs and AOT graphs only
    # when asked. Missing switches (older torch) are skipped.
    GLOBAL_SETTINGS.set_flag("torch._inductor.config:fx_graph_cache", True)
    GLOBAL_SETTINGS.set_flag("torch._functorch.config:enable_autograd_cache", True)
    from ..compat.inductor import install as install_coordesc

    kept = False if keep_coordesc is False else install_coordesc(force=bool(keep_coordesc))
    info = {"cache_dir": str(paths["root"]), "inductor_cache_dir": str(paths["inductor"]),
            "keep_coordesc": kept}  # cached coordinate-descent configs kept (compat/inductor.py)
    from .lock import maintain
    from .megacache import load_entries

    # An install killed mid-way is rolled back; files damaged in place are removed (compiled again).
    upkeep = maintain(paths["root"])
    loaded = load_entries(paths["root"])
    installed = store.read_json(paths["installed"])
    info["cache"] = {"megacache_loaded": loaded["loaded"], "megacache_skipped": loaded["skipped"],
                     "artifacts": loaded["artifacts"], "load_seconds": loaded["seconds"],
                     "installed_archive": (installed or {}).get("archive_sha256"),
                     "repaired": upkeep["repaired"], "recovered": upkeep["recovered"]}
    return info


def activate_nexfort(cache_dir: str | Path) -> dict:
    """Point nexfort's caches at ``cache_dir``: its compiled-graph cache (NEXFORT_GRAPH_CACHE=1) lives in
    TORCHINDUCTOR_CACHE_DIR/compiledgraph, beside inductor's FX-graph cache, so warm/pack/install cover it."""
    inductor_dir = cache_paths(cache_dir)["inductor"]
    inductor_dir.mkdir(parents=True, exist_ok=True)
    _point_inductor_at(inductor_dir)
    GLOBAL_SETTINGS.set_env("NEXFORT_GRAPH_CACHE", "1")
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    return {"nexfort_graph_cache_dir": str(inductor_dir / "compiledgraph")}
