"""``fp8_fused_activation=true``: the blocks' fp8 activations quantized by the kernels that produce them
(``sd3plugin.kernels.fp8_block``), after quantizing and before compiling; the handle puts diffusers'
forward back and drops the references to the fp8 weights."""
from __future__ import annotations

import importlib.util

import torch

from ..compat import diffusers as dcompat
from ..errors import ConfigError
from ..kernels import fp8_block
from ..kernels.attention import SD3AttnProcessor
from .base import Handle, Run

NAME = "fp8_fused_activation"
FIX = "or set fp8_fused_activation=false"


def unavailable(device: str) -> str | None:
    """Why the fused kernels cannot run here (None if they can)."""
    if device != "cuda" or not torch.cuda.is_available():
        return "fp8_fused_activation=true runs Triton kernels on a CUDA GPU (this run is on CPU)"
    if importlib.util.find_spec("triton") is None:
        return "fp8_fused_activation=true needs Triton (pip install triton)"
    return None


def apply(run: Run) -> Handle | None:
    plan = run.plan
    if not plan.fp8_fused_activation:
        return None
    why = unavailable(plan.device)
    if why:
        raise ConfigError(f"{why}; {FIX}")
    t = run.transformer
    if dcompat.has_adapters(t):
        raise ConfigError(f"fp8_fused_activation=true bypasses the quantized layers' forward, where LoRA adapters "
                          f"run ({', '.join(dcompat.adapter_names(t))}); fuse and unload them first, {FIX}")
    procs = {type(m.processor).__name__ for _, m in dcompat.attention_modules(t)
             if not isinstance(m.processor, SD3AttnProcessor)}
    if procs:
        raise ConfigError(f"fp8_fused_activation=true needs sd3plugin's attention processor on every attention "
                          f"(compiled backends install it), found {', '.join(sorted(procs))}; use "
                          f"backend=inductor, {FIX}")
    done = fp8_block.install(t)
    if not done.blocks:
        reasons = sorted(set(done.skipped.values()))
        raise ConfigError(f"fp8_fused_activation=true applies to no transformer block ({'; '.join(reasons)}); "
                          f"it needs quant=fp8_e4m3_e4m3_dynamic quantized by torchao, {FIX}")
    rep = {"blocks": len(done.blocks), "fp8_linears": len(done.linears), "skipped": dict(done.skipped)}
    run.report["fp8_fused_activation"] = rep
    return Handle(NAME, done, rep)
