"""``optimize(pipe_or_transformer, cfg, overrides)``: the one verb that applies a config.

Order: resolve backend -> fuse QKV -> attention kernel -> quantize -> memory format -> compile (regional). Any failure
before the first call rolls everything back (on_error=raise) or keeps the eager module (fallback); a
compile failure at the first call is caught by a guard around the transformer's forward, which undoes
the compilation, warns once and records the cause in ``report(pipe)``.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from . import attention, cache, fa4_prewarm, gelu_epilogue
from .backends import CompilePlan, resolve_backend
from .config import compose, parse_mode
from .config.modes import torch_flags
from .config.resolve import resolve_device, resolve_dtype  # noqa: F401  (moved to config; names kept)
from .errors import BackendUnavailableError, CompileError, ConfigError
from .global_settings import GLOBAL_SETTINGS

log = logging.getLogger("sd3plugin")
REPORT_ATTR = "_sd3plugin_report"


def is_sd3_transformer(obj) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(obj, SD3Transformer2DModel)


def is_sd3_pipeline(obj) -> bool:
    return is_sd3_transformer(getattr(obj, "transformer", None))


def make_plan(cfg: DictConfig) -> CompilePlan:
    return CompilePlan(
        mode_spec=cfg.mode.spec, tokens=parse_mode(cfg.mode.spec), device=resolve_device(cfg.device),
        dynamic=bool(cfg.dynamic.enabled), recompile_limit=int(cfg.dynamic.recompile_limit),
        memory_format=cfg.memory_format.name, cache_dir=str(cfg.cache_dir),
        options=copy.deepcopy(OmegaConf.to_container(cfg.backend_options, resolve=True)))


def _memory_format(name: str):
    return {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format}.get(name)


class _CompiledCall:
    """Wraps a method of a module holding compiled parts (the transformer's ``forward``, the VAE's
    ``decode``): on a compile failure, undo the compilation, run eagerly, and report it (or raise)."""

    def __init__(self, owner, method: str, undo, report: dict, on_error: str, what: str, settings: dict):
        self.owner, self.method, self.undo, self.report = owner, method, undo, report
        self.on_error, self.what, self.settings = on_error, what, settings
        self.active = True

    def __call__(self, *args, **kwargs):
        # The cache dir and flags of this pipeline's plan hold during its calls, hook enabled or not.
        with GLOBAL_SETTINGS.scoped(self.settings):
            return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        fn = getattr(type(self.owner), self.method)
        if not self.active:
            return fn(self.owner, *args, **kwargs)
        try:
            return fn(self.owner, *args, **kwargs)
        except Exception as exc:  # compile failures surface at the first call
            self.undo()
            self.active = False
            try:
                out = fn(self.owner, *args, **kwargs)
            except Exception:
                raise exc from None  # the eager module fails too: not a compile problem
            if self.on_error == "raise":
                raise CompileError(f"{self.what} compilation failed at the first call: "
                                   f"{type(exc).__name__}: {_first_line(exc)}; use on_error=fallback to "
                                   "run eagerly instead, or backend=eager") from exc
            _record_fallback(self.report, exc, "first call", self.what)
            return out

    def remove(self) -> None:
        self.undo()
        self.owner.__dict__.pop(self.method, None)


def _first_line(exc: BaseException) -> str:
    """One line naming the root cause (dynamo wraps backend errors in BackendCompilerFailed)."""
    root = exc
    while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    text = str(root).strip().splitlines()
    line = text[0][:300] if text else ""
    return f"{type(root).__name__}: {line}" if root is not exc else line or type(exc).__name__


def _record_fallback(report: dict, exc: BaseException, when: str, what: str | None = None) -> None:
    what = what or report["backend"]
    report["status"] = "fallback"
    report["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
    report["compiled_modules"] = [m for m in report["compiled_modules"] if not m.startswith(
        "vae" if what == "vae" else "transformer")]
    msg = (f"sd3plugin: {what} compilation failed ({when}): {report['error']}; "
           "running eagerly (on_error=fallback)")
    log.warning(msg)


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
    report = {
        "optimized": True, "status": "eager", "backend": None, "backend_reason": None,
        "mode": {"name": cfg.mode.name, "spec": cfg.mode.spec, "tokens": list(plan.tokens)},
        "memory_format": plan.memory_format, "dynamic": plan.dynamic, "device": plan.device,
        "quant": {"type": cfg.quant.type, "modules": []}, "compiled_modules": [], "fused_qkv": False, "fused_gelu": 0,
        "attention": {"kernel": "diffusers", "reason": "backend=eager keeps diffusers' processors"},
        "error": None, "on_error": cfg.on_error,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        backend, reason = resolve_backend(cfg.backend, plan)
    except BackendUnavailableError as exc:
        if cfg.on_error == "raise":
            raise
        backend, reason = resolve_backend("eager", plan)[0], f"fallback to eager: {exc}"
        report["error"] = str(exc)
        log.warning("sd3plugin: %s; running eagerly (on_error=fallback)", exc)
    report["backend"], report["backend_reason"] = backend.name, reason
    log.info("sd3plugin: backend %s (%s)", backend.name, reason)

    report.update(cache.activate(plan.cache_dir))
    for path, value in torch_flags(plan.tokens, plan.device).items():
        GLOBAL_SETTINGS.set_flag(path, value)
    for name in ("dynamo.recompile_limit", "dynamo.cache_size_limit"):
        GLOBAL_SETTINGS.set_flag(name, max(plan.recompile_limit, 8))

    from .quant import quantize

    started = time.perf_counter()
    undo_attention = _no_op
    if backend.name != "eager":
        kernel, why = _attention_kernel(cfg, plan, backend.name, transformer)
        report["attention"] = {"kernel": kernel, "reason": why}
        if cfg.fuse_qkv:
            report["fused_qkv"] = attention.fuse_projections(transformer)
        undo_attention = attention.set_attention(transformer, kernel)
        report["attention"]["modules"] = undo_attention.replaced
        if kernel == "fa4":  # FA4's JIT compile runs in a child process while inductor compiles
            report["attention"]["prewarm"] = _start_fa4_prewarm(cfg, plan, transformer)
    try:  # after fusing: quantized weights cannot be concatenated, so the fused to_qkv gets quantized
        report["quant"] = quantize(transformer, cfg.quant, plan.device, backend=backend.name)
    except Exception:
        undo_attention()
        if report["fused_qkv"]:
            attention.unfuse_projections(transformer)
        raise
    if backend.name != "eager":  # after quantizing: quantized projections keep the ordinary path
        report["attention"]["joint_op_modules"] = attention.joint_op_modules(transformer)
    undo_gelu = _no_op
    if cfg.fuse_gelu and backend.name == "inductor" and plan.device == "cuda":  # after quantizing: plain weights only
        undo_gelu = gelu_epilogue.fuse_gelu(transformer)
        report["fused_gelu"] = undo_gelu.fused
    vae = getattr(target, "vae", None)
    fmt = _memory_format(plan.memory_format)
    if vae is not None and fmt is not None:
        vae.to(memory_format=fmt)

    def undo_compile():
        backend.undo(transformer)
        undo_attention()  # a kernel that fails at its first call goes with the compilation
        undo_gelu()

    try:
        info = backend.compile(transformer, plan)
    except Exception as exc:
        undo_compile()
        if cfg.on_error == "raise":
            raise CompileError(f"{backend.name} compilation failed: {type(exc).__name__}: {_first_line(exc)}; "
                               "fix the option named above, or use on_error=fallback / backend=eager") from exc
        report["backend_reason"] += "; compile failed"
        _record_fallback(report, exc, "setup")
    else:
        report.update(info)
        if info.get("compiled_modules"):
            report["status"] = "compiled"
            settings = GLOBAL_SETTINGS.snapshot()
            transformer.forward = _CompiledCall(transformer, "forward", undo_compile,
                                                report, cfg.on_error, backend.name, settings)
            if cfg.compile_vae and vae is not None and backend.name == "inductor":
                _compile_vae_decoder(vae, backend, plan, report, cfg.on_error, settings)
    report["setup_seconds"] = round(time.perf_counter() - started, 3)
    report["global_settings"] = GLOBAL_SETTINGS.changed()
    _attach(target, transformer, report)
    return target


def _compile_vae_decoder(vae, backend, plan, report: dict, on_error: str, settings: dict) -> None:
    """compile_vae=true: compile the VAE decoder too (end-to-end time); same fallback rules."""
    decoder = vae.decoder
    decoder.compile(backend="inductor", options=backend.options(plan), dynamic=True if plan.dynamic else False)
    vae.decode = _CompiledCall(vae, "decode", lambda: setattr(decoder, "_compiled_call_impl", None),
                               report, on_error, "vae", settings)
    report["compiled_modules"] = report["compiled_modules"] + ["vae.decoder"]


def _no_op() -> None:
    pass


def _attention_kernel(cfg, plan, backend: str, transformer) -> tuple[str, str]:
    """The attention kernel for this plan; FA4's compiled kernels are cached under cache_dir."""
    if backend == "nexfort":
        return "sdpa", "backend=nexfort: torch's scaled_dot_product_attention (nexfort's stack is torch 2.4)"
    if cfg.attention != "sdpa":
        fa4_dir = cache.cache_paths(plan.cache_dir)["inductor"] / "fa4"
        GLOBAL_SETTINGS.set_env("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        GLOBAL_SETTINGS.set_env("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(fa4_dir))
        for flag, value in attention.fa4_cache_flags(str(fa4_dir)).items():  # FA4 imported already
            GLOBAL_SETTINGS.set_flag(flag, value)
    return attention.resolve_kernel(cfg.attention, plan.device, transformer.dtype)


def _start_fa4_prewarm(cfg, plan, transformer) -> dict:
    shapes = fa4_prewarm.attention_shapes(transformer.config, cfg.height, cfg.width, cfg.num_images,
                                          cfg.guidance_scale > 1)
    fa4_dir = str(cache.cache_paths(plan.cache_dir)["inductor"] / "fa4")
    if attention.fa4_cache_dir() != fa4_dir:  # flash-attn-4 was imported before cache_dir was set
        return {"state": f"skipped: FA4 caches its kernels in {attention.fa4_cache_dir()}, not under cache_dir "
                         "(flash_attn.cute was imported before sd3plugin set its cache directory)"}
    return fa4_prewarm.start(fa4_dir, shapes, transformer.dtype, transformer.device.index or 0)


def _attach(target, transformer, report: dict) -> None:
    setattr(transformer, REPORT_ATTR, report)
    if target is not transformer:
        setattr(target, REPORT_ATTR, report)


def report(pipe_or_transformer) -> dict:
    """What sd3plugin applied to this pipeline/transformer (a copy); ``{"optimized": False}`` if nothing."""
    rep = getattr(pipe_or_transformer, REPORT_ATTR, None)
    if rep is None:
        rep = getattr(getattr(pipe_or_transformer, "transformer", None), REPORT_ATTR, None)
    return copy.deepcopy(rep) if rep is not None else {"optimized": False}


def undo(pipe_or_transformer) -> None:
    """Remove sd3plugin's compilation from a pipeline/transformer (quantization stays)."""
    transformer = pipe_or_transformer if is_sd3_transformer(pipe_or_transformer) else \
        getattr(pipe_or_transformer, "transformer", None)
    for owner, method in ((transformer, "forward"), (getattr(pipe_or_transformer, "vae", None), "decode")):
        call = owner.__dict__.get(method) if owner is not None else None
        if isinstance(call, _CompiledCall):
            call.remove()
    for obj in (pipe_or_transformer, transformer):
        if obj is not None and REPORT_ATTR in obj.__dict__:
            delattr(obj, REPORT_ATTR)
