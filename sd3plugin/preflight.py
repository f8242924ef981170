"""Before anything loads: can this machine run what the config asks for explicitly?

``check_runnable(cfg)`` resolves the plan (device, dtype, fp8 quant on this GPU) and refuses, with a
ConfigError naming the reason and the fix (exit code 2 on the command line), an explicit ``backend``,
``attention`` or ``quant`` that cannot run here. ``auto`` is never refused: it picks what runs and says why
(returned here, and in ``report(pipe)`` once the pipeline is optimized). The apps call it before they build
or load a model; the API (``optimize``, the hook) keeps ``on_error`` for a backend that fails later.
"""
from __future__ import annotations

import importlib.util
import os

from .errors import ConfigError

BACKEND_FIX = {
    "nexfort": "use backend=auto (it picks what runs here) or backend=inductor",
}


def check_backend(plan) -> str:
    """The backend's reason; ConfigError when an explicitly named one cannot run here."""
    from .backends import get_backend, resolve_backend

    if plan.backend == "auto":
        return resolve_backend("auto", plan)[1]
    ok, why = get_backend(plan.backend).availability(plan)
    if not ok:
        fix = BACKEND_FIX.get(plan.backend, "use backend=auto (it picks what runs here)")
        raise ConfigError(f"backend={plan.backend} cannot run here: {why}; {fix}")
    return f"requested backend={plan.backend}"


def check_attention(plan) -> str:
    """The attention kernel's reason; ConfigError when an explicitly named kernel cannot run here."""
    from .kernels.attention import resolve_kernel

    if plan.backend == "eager":  # nothing is compiled: diffusers' own processors stay
        return "backend=eager keeps diffusers' processors"
    return resolve_kernel(plan.attention, plan.device, plan.dtype)[1]


def check_quant(plan) -> str:
    """ConfigError when the quant preset needs what is not here (torchao; the GPU is checked by the plan)."""
    from .quant import LICENSE_ENV

    if plan.quant_type == "none":
        return "quant=none"
    if plan.backend == "nexfort" and os.environ.get(LICENSE_ENV):
        return f"quant={plan.quant_type} (nexfort.ao, {LICENSE_ENV} is set)"
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"quant={plan.quant_type} needs torchao, which is not installed; pip install torchao "
                          "(or pip install '.[quant]' from a checkout of sd3plugin), or use quant=none")
    return f"quant={plan.quant_type} (torchao)"


def check_runnable(cfg) -> dict:
    """Check ``cfg``'s explicit choices against this machine; ``{"backend", "attention", "quant"}`` reasons.

    Order: device and fp8 GPU (the plan), quant, backend, attention: the first problem is the one reported."""
    from .plan import make_plan

    plan = make_plan(cfg)
    return {"quant": check_quant(plan), "backend": check_backend(plan), "attention": check_attention(plan)}
