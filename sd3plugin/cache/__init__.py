"""Compile caches: where they live (``cache_dir``) and how they are activated for a process."""
from __future__ import annotations

from pathlib import Path

from ..global_settings import GLOBAL_SETTINGS


def cache_paths(cache_dir: str | Path) -> dict[str, Path]:
    root = Path(cache_dir).expanduser()
    return {"root": root, "inductor": root / "inductor", "triton": root / "inductor" / "triton",
            "models": root / "models"}


def activate(cache_dir: str | Path) -> dict:
    """Point inductor's (and Triton's) on-disk caches at ``cache_dir``; return what was set."""
    paths = cache_paths(cache_dir)
    paths["inductor"].mkdir(parents=True, exist_ok=True)
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", str(paths["inductor"]))
    GLOBAL_SETTINGS.set_env("TRITON_CACHE_DIR", str(paths["triton"]))
    return {"cache_dir": str(paths["root"]), "inductor_cache_dir": str(paths["inductor"])}


def activate_nexfort(cache_dir: str | Path) -> dict:
    """Point nexfort's caches at ``cache_dir``: its compiled-graph cache (NEXFORT_GRAPH_CACHE=1) lives in
    TORCHINDUCTOR_CACHE_DIR/compiledgraph, beside inductor's FX-graph cache, so warm/pack/install cover it."""
    inductor_dir = cache_paths(cache_dir)["inductor"]
    inductor_dir.mkdir(parents=True, exist_ok=True)
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    GLOBAL_SETTINGS.set_env("NEXFORT_GRAPH_CACHE", "1")
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    return {"nexfort_graph_cache_dir": str(inductor_dir / "compiledgraph")}
