"""Process-wide settings of a plan: the compile caches under ``cache_dir``, torch.backends flags of the mode
tokens, Dynamo's recompile limits. Recorded, so the pipeline's ``undo()`` puts back what was there.

``activate(cache_dir)`` points inductor's and Triton's on-disk caches at ``cache_dir``, keeps cached
coordinate-descent configs (``compat/inductor.py``) and hot-loads the Mega-Cache entries warmed or installed
there (once per process); ``optimize()`` calls it through ``apply`` before compiling.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..cache import cache_paths, store
from ..config.modes import torch_flags
from ..global_settings import GLOBAL_SETTINGS
from .base import Handle, Run

NAME = "settings"


def activate(cache_dir: str | Path, keep_coordesc: bool | None = None) -> dict:
    """Point inductor's and Triton's caches at ``cache_dir`` and load its Mega-Cache entries.

    Returns what was set and loaded (it goes into ``report(pipe)["cache"]``). Cheap when nothing is
    installed: no entry, no torch.compiler call.
    """
    from ..cache.lock import maintain
    from ..cache.megacache import load_entries
    from ..compat.inductor import install as install_coordesc
    from ..compat.inductor import point_cache_at

    paths = cache_paths(cache_dir)
    paths["inductor"].mkdir(parents=True, exist_ok=True)
    point_cache_at(paths["inductor"])
    GLOBAL_SETTINGS.set_env("TRITON_CACHE_DIR", str(paths["triton"]))
    # On by default in current torch; torch 2.4 (the nexfort stack) keeps FX graphs and AOT graphs only
    # when asked. Missing switches (older torch) are skipped.
    GLOBAL_SETTINGS.set_flag("torch._inductor.config:fx_graph_cache", True)
    GLOBAL_SETTINGS.set_flag("torch._functorch.config:enable_autograd_cache", True)
    kept = False if keep_coordesc is False else install_coordesc(force=bool(keep_coordesc))
    info = {"cache_dir": str(paths["root"]), "inductor_cache_dir": str(paths["inductor"]),
            "keep_coordesc": kept}  # cached coordinate-descent configs kept (compat/inductor.py)
    # An install killed mid-way is rolled back; files damaged in place are removed (compiled again).
    upkeep = maintain(paths["root"])
    loaded = load_entries(paths["root"])
    installed = store.read_json(paths["installed"])
    info["cache"] = {"megacache_loaded": loaded["loaded"], "megacache_skipped": loaded["skipped"],
                     "artifacts": loaded["artifacts"], "load_seconds": loaded["seconds"],
                     "installed_archive": (installed or {}).get("archive_sha256"),
                     "repaired": upkeep["repaired"], "recovered": upkeep["recovered"]}
    return info


def apply(run: Run) -> Handle:
    plan = run.plan
    started = time.perf_counter()
    with GLOBAL_SETTINGS.recording() as changes:
        if plan.backend != "eager":  # backend=eager compiles nothing: inductor stays unimported
            info = activate(plan.cache_dir, keep_coordesc=getattr(plan.cfg, "keep_coordesc", True)
                            if plan.cfg is not None else True)
            run.report.update(info)
            run.report.setdefault("startup", {})["cache"] = {"megacache_seconds": info["cache"]["load_seconds"]}
        for path, value in torch_flags(plan.tokens, plan.device).items():
            GLOBAL_SETTINGS.set_flag(path, value)
        for name in ("dynamo.recompile_limit", "dynamo.cache_size_limit"):
            GLOBAL_SETTINGS.set_flag(name, max(plan.recompile_limit, 8))
    run.report.setdefault("startup", {})["settings_seconds"] = round(time.perf_counter() - started, 3)  # caches too
    return Handle(NAME, lambda: GLOBAL_SETTINGS.revert(changes), {})
