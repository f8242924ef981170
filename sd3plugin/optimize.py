"""``optimize(pipe_or_transformer, cfg, overrides)``: the one verb that applies a config; ``undo()`` removes it.

The config is composed and resolved into a ``Plan`` once; then each transform of ``STACK`` applies its part
and returns a handle that knows how to remove it (``sd3plugin/transforms/``):

    settings -> backend -> fuse_qkv -> attention -> quantize -> fuse_gelu -> fp8_fused_activation
             -> memory_format -> lora
             -> compile (regional, guarded at every call) -> compile_vae -> compile_text_encoders
             -> step_cache (cache-dit, wrapping the guarded forward)

``undo()`` removes the handles in reverse order: processors, fused projections (the state dict is diffusers'
own again), VAE memory format, process-wide settings, cache-dit; quantized weights stay quantized (it says so).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Iterable

from omegaconf import OmegaConf

from .config import compose
from .errors import ConfigError
from .global_settings import GLOBAL_SETTINGS
from .plan import Plan, make_plan
from .transforms import (attention, backend, compile, fp8_activation, fuse_qkv, gelu, lora, memory_format, quantize,
                         settings, step_cache)
from .startup import FirstImageTimer
from .transforms.base import Handle, Run

log = logging.getLogger("sd3plugin")
REPORT_ATTR = "_sd3plugin_report"
HANDLES_ATTR = "_sd3plugin_handles"


def is_sd3_transformer(obj) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(obj, SD3Transformer2DModel)


def is_sd3_pipeline(obj) -> bool:
    return is_sd3_transformer(getattr(obj, "transformer", None))


def _new_report(cfg, plan: Plan) -> dict:
    return {
        "optimized": True, "status": "eager", "backend": None, "backend_reason": None,
        "mode": {"name": cfg.mode.name, "spec": cfg.mode.spec, "tokens": list(plan.tokens)},
        "memory_format": plan.memory_format, "dynamic": plan.dynamic, "device": plan.device,
        "quant": {"type": plan.quant_type, "modules": []}, "compiled_modules": [], "fused_qkv": False,
        "fused_gelu": 0, "attention": {"kernel": "diffusers", "reason": "backend=eager keeps diffusers' processors"},
        "precompiled": {"used": False, "reason": "nothing is compiled (backend eager)"}, "startup": {},
        "error": None, "on_error": plan.on_error, "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _apply(run: Run) -> None:
    """The stack, in order. Each handle is kept at once, so a failure part-way undoes what was done."""
    keep = run.handles.append
    for step in (settings, backend):
        h = step.apply(run)
        if h is not None:
            keep(h)
    kernels = []
    for step in (fuse_qkv, attention, quantize, gelu, fp8_activation):
        h = step.apply(run)
        if h is not None:
            keep(h)
            if step in (attention, gelu, fp8_activation):
                kernels.append(h)
        if step is quantize:
            attention.finish(run)
    for step in (memory_format, lora):
        h = step.apply(run)
        if h is not None:
            keep(h)
    h = compile.apply(run, kernels)
    if h is not None:
        for k in kernels:  # the compile handle removes them with the compilation
            run.handles.remove(k)
        keep(h)
        for part in (compile.apply_vae, compile.apply_text_encoders):
            h = part(run)
            if h is not None:
                keep(h)
    h = step_cache.apply(run)  # last: cache-dit's forward wraps the compile guard and calls compiled blocks
    if h is not None:
        keep(h)
    if run.target is not run.transformer:  # text encoding, denoising and VAE of the first image
        timer = FirstImageTimer(run.target, run.report.setdefault("startup", {}))
        keep(Handle("startup_timer", timer.remove, {}))


def optimize(pipe_or_transformer, cfg=None, overrides: Iterable[str] = ()):
    """Apply the composed config to an SD3 pipeline or SD3Transformer2DModel; return the same object."""
    cfg = compose(cfg, overrides)
    target = pipe_or_transformer
    transformer = target if is_sd3_transformer(target) else getattr(target, "transformer", None)
    if not is_sd3_transformer(transformer):
        raise ConfigError(f"sd3plugin.optimize expects an SD3 pipeline or SD3Transformer2DModel, got "
                          f"{type(target).__name__}; other pipelines are not supported")
    if getattr(transformer, REPORT_ATTR, None) is not None:
        _attach(target, transformer, getattr(transformer, REPORT_ATTR))
        return target  # already optimized: one optimization per module

    plan = make_plan(cfg)
    run = Run(target=target, transformer=transformer, plan=plan, report=_new_report(cfg, plan))
    started = time.perf_counter()
    try:
        _apply(run)
    except BaseException:
        for h in reversed(run.handles):
            h.remove()
        raise
    run.report["setup_seconds"] = round(time.perf_counter() - started, 3)
    run.report.setdefault("startup", {})["setup_seconds"] = run.report["setup_seconds"]
    run.report["transforms"] = [h.name for h in run.handles]
    run.report["global_settings"] = GLOBAL_SETTINGS.changed()
    setattr(transformer, HANDLES_ATTR, run.handles)
    _attach(target, transformer, run.report)
    return target


def _attach(target, transformer, report: dict) -> None:
    setattr(transformer, REPORT_ATTR, report)
    if target is not transformer:
        setattr(target, REPORT_ATTR, report)


def _transformer_of(obj):
    return obj if is_sd3_transformer(obj) else getattr(obj, "transformer", None)


def record_startup(pipe_or_transformer, key: str, value) -> None:
    """Add ``value`` as ``report(pipe)["startup"][key]`` (merged into a dict already there): loading is
    timed outside ``optimize()``."""
    transformer = _transformer_of(pipe_or_transformer)
    rep = getattr(transformer, REPORT_ATTR, None) if transformer is not None else None
    if rep is not None:
        startup = rep.setdefault("startup", {})
        if isinstance(value, dict) and isinstance(startup.get(key), dict):
            startup[key].update(value)
        else:
            startup[key] = value


def report(pipe_or_transformer) -> dict:
    """What sd3plugin applied to this pipeline/transformer (a copy); ``{"optimized": False}`` if nothing."""
    transformer = _transformer_of(pipe_or_transformer)
    own = getattr(transformer, REPORT_ATTR, None) if transformer is not None else None
    rep = getattr(pipe_or_transformer, REPORT_ATTR, None)
    if rep is not None and own is not rep:  # pipe.transformer was replaced after optimizing
        return {"optimized": False, "note": "pipe.transformer was replaced after optimization; "
                                            "call sd3plugin.optimize(pipe) to optimize the new one"}
    rep = own if rep is None else rep
    if rep is None:
        return {"optimized": False}
    out = copy.deepcopy(rep)
    if out.get("step_cache", {}).get("name", "none") != "none":
        out["step_cache"]["last_call"] = step_cache.last_call(transformer, out["step_cache"])
    return out


def undo(pipe_or_transformer) -> None:
    """Remove what ``optimize()`` applied, in reverse order (quantized weights stay quantized)."""
    transformer = _transformer_of(pipe_or_transformer)
    handles = transformer.__dict__.pop(HANDLES_ATTR, []) if transformer is not None else []
    for h in reversed(handles):
        h.remove()
    for obj in (pipe_or_transformer, transformer):
        if obj is not None and REPORT_ATTR in obj.__dict__:
            delattr(obj, REPORT_ATTR)
