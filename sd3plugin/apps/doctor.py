"""What ``sd3plugin-cache doctor`` shows: versions, GPU, which backends and attention kernel run here and why,
the cache directory, nexfort's install layout."""
from __future__ import annotations

import os
from pathlib import Path

from .. import environment


def directory_size(path: str | Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def backends_usable(plan) -> dict:
    """{name: {"usable": bool, "reason": str}} for every registered backend, plus what auto picks."""
    from ..backends import _REGISTRY, resolve_backend

    out = {}
    for name, cls in _REGISTRY.items():
        ok, why = cls().availability(plan)
        out[name] = {"usable": bool(ok), "reason": why}
    chosen, reason = resolve_backend("auto", plan)
    out["auto"] = {"usable": True, "chooses": chosen.name, "reason": reason}
    return out


def attention_choice(plan) -> dict:
    """What ``attention=auto`` picks on this machine (fp16 weights assumed on CUDA) and why."""
    import torch

    from ..kernels.attention import resolve_kernel

    dtype = torch.float16 if plan.device == "cuda" else torch.float32
    kernel, reason = resolve_kernel("auto", plan.device, dtype)
    return {"auto_chooses": kernel, "reason": reason}


def report(cfg) -> dict:
    """Everything ``sd3plugin-cache doctor`` shows, as a dict (its --json output)."""
    from ..compat import inductor as coordesc
    from ..compat import precompile
    from ..plan import make_plan

    plan = make_plan(cfg)
    cache = Path(plan.cache_dir).expanduser()
    return {
        "versions": environment.versions(),
        "gpu": environment.gpu_info(),
        "backends": backends_usable(plan),
        "attention": attention_choice(plan),
        "cache": {"dir": str(cache), "exists": cache.is_dir(),
                  "size_bytes": directory_size(cache) if cache.is_dir() else 0,
                  "keep_coordesc": coordesc.state(),
                  "precompile": dict(zip(("supported", "reason"), precompile.support()))},
        "nexfort_layout": {"misplaced": [str(m.target) for m in environment.misplaced_nexfort_modules()],
                           "target": environment.codegen_target()},
        "licence_key_set": bool(os.environ.get(environment.LICENCE_ENV)),
    }
