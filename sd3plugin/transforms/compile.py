"""Compilation by the plan's backend (regional: the repeated blocks), guarded at every call.

``GuardedForward`` replaces the transformer's ``forward`` (and, with ``compile_vae``, the VAE's ``decode``;
with ``compile_text_encoders``, each text encoder's ``forward``, whose inner stack is compiled):
- before each call it keeps what diffusers may have changed since exact: the fused projections
  (``fuse_qkv.FusedProjections.sync``), CUDA graphs suspended while LoRA adapters or model offload are in use;
- it counts the graphs Dynamo compiles during its calls (``report["compilations"]``, and
  ``report["recompilations"]`` after the first call), splits the first call's time (tracing, inductor,
  kernel loading, autotuning: ``report["startup"]["first_call"]``) and adds up CUDA-graph capture time;
- a compile failure at the first call undoes the compilation and the kernels that go with it, runs eagerly
  and reports why (``on_error=fallback``) or raises ``CompileError`` (``on_error=raise``).
"""
from __future__ import annotations

import logging
import time

import torch

from ..backends import cudagraph
from ..compat import diffusers as dcompat
from ..compat import torch as tcompat
from ..errors import CompileError, caused_by_interrupt
from .base import Handle, Run

log = logging.getLogger("sd3plugin")
NAME = "compile"


def first_line(exc: BaseException) -> str:
    """One line naming the root cause (dynamo wraps backend errors in BackendCompilerFailed)."""
    root = exc
    while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    text = str(root).strip().splitlines()
    line = text[0][:300] if text else ""
    return f"{type(root).__name__}: {line}" if root is not exc else line or type(exc).__name__


def is_auxiliary(what: str) -> bool:
    """The VAE and the text encoders: compiled around the transformer, without its guard's bookkeeping."""
    return what == "vae" or what.startswith("text_encoder")


def record_fallback(report: dict, exc: BaseException, when: str, what: str | None = None) -> None:
    what = what or report["backend"]
    report["status"] = "fallback"
    report["error"] = f"{type(exc).__name__}: {first_line(exc)}"
    report["compiled_modules"] = [m for m in report["compiled_modules"] if not m.startswith(
        f"{what}." if is_auxiliary(what) else "transformer")]
    log.warning("sd3plugin: %s compilation failed (%s): %s; running eagerly (on_error=fallback)",
                what, when, report["error"])


class GuardedForward:
    """Installed as ``owner.<method>`` (an instance attribute); ``remove()`` takes it away again."""

    def __init__(self, owner, method: str, undo, report: dict, on_error: str, what: str, fused=None):
        self.owner, self.method, self.undo, self.report = owner, method, undo, report
        self.on_error, self.what, self.fused = on_error, what, fused
        self.active, self.calls, self.aux = True, 0, is_auxiliary(what)
        # A text encoder's forward already installed on the instance (accelerate's offload hook) keeps
        # running inside the guard.
        self.previous = owner.__dict__.get(method) if self.aux else None

    def before_call(self) -> None:
        """Keep the fused projections exact and CUDA graphs valid; CudaGraphForward calls this too, since a
        replayed graph never reaches ``forward``."""
        if self.active and not self.aux:
            self._before()

    def _before(self) -> None:
        owner, report = self.owner, self.report
        adapters = dcompat.has_adapters(owner)
        if self.fused is not None and self.fused.items:
            report["fused_qkv_state"] = self.fused.sync()
        if adapters or report.get("lora", {}).get("adapters"):
            report.setdefault("lora", {})["adapters"] = dcompat.adapter_names(owner)
        runner = cudagraph.runner_of(owner)
        if runner is not None:
            reason = ("LoRA adapters are loaded (their set_adapters weights would be baked into the graphs)"
                      if adapters else "model offload moves the weights between calls"
                      if dcompat.offload_hooked(owner) else None)
            if self.fused is not None and self.fused.counts.get("rebuilt"):
                runner.drop()  # the weights moved: graphs hold the old addresses
            runner.suspend(reason)

    def __call__(self, *args, **kwargs):
        fn = (getattr(type(self.owner), self.method) if self.previous is None
              else lambda _owner, *a, **kw: self.previous(*a, **kw))
        if not self.active:
            return fn(self.owner, *args, **kwargs)
        self.before_call()
        before = tcompat.graph_count()
        first = self.calls == 0 and not self.aux
        if first:
            metrics, started = tcompat.compile_metrics(), time.perf_counter()
        try:
            out = fn(self.owner, *args, **kwargs)
            if first:
                self.report.setdefault("startup", {})["first_call"] = {
                    "seconds": round(time.perf_counter() - started, 3),
                    **tcompat.compile_breakdown(metrics, tcompat.compile_metrics())}
            return out
        except Exception as exc:  # compile failures surface at the first call
            if caused_by_interrupt(exc):  # Ctrl-C during compilation: stop, do not fall back
                raise KeyboardInterrupt from exc
            self.undo()
            self.active = False
            try:
                out = fn(self.owner, *args, **kwargs)
            except Exception:
                raise exc from None  # the eager module fails too: not a compile problem
            if self.on_error == "raise":
                raise CompileError(f"{self.what} compilation failed at the first call: "
                                   f"{type(exc).__name__}: {first_line(exc)}; use on_error=fallback to "
                                   "run eagerly instead, or backend=eager") from exc
            record_fallback(self.report, exc, "first call", self.what)
            return out
        finally:
            new = tcompat.graph_count() - before
            key = ("compilations" if not self.aux else "vae_compilations" if self.what == "vae"
                   else "text_encoder_compilations")
            self.report[key] = self.report.get(key, 0) + new
            if self.calls and not self.aux:
                self.report["recompilations"] = self.report.get("recompilations", 0) + new
            self.calls += 1
            if not self.aux:
                self._after()

    def _after(self) -> None:
        """Start-up figures that accrue over the first calls: CUDA-graph capture, FA4's first calls."""
        startup = self.report.setdefault("startup", {})
        runner = cudagraph.runner_of(self.owner)
        if runner is not None and runner.capture_seconds:
            startup["cuda_graph_capture_seconds"] = round(runner.capture_seconds, 3)
        if self.report.get("attention", {}).get("kernel") == "fa4":
            from ..kernels import fa4

            startup["attention_kernel"] = {**fa4.STATS, "prewarm_waited_seconds": (
                self.report["attention"].get("prewarm") or {}).get("waited_seconds")}

    def remove(self) -> None:
        self.undo()
        self.owner.__dict__.pop(self.method, None)
        if self.previous is not None:
            setattr(self.owner, self.method, self.previous)


def apply(run: Run, kernel_handles: list[Handle]) -> Handle | None:
    """Compile with ``run.backend``; ``kernel_handles`` (attention, GELU epilogue) go with the compilation."""
    backend, plan, report, t = run.backend, run.plan, run.report, run.transformer

    def undo_compile():
        backend.undo(t)
        for h in reversed(kernel_handles):  # a kernel that fails at its first call goes with the compilation
            h.remove()

    try:
        info = backend.compile(t, plan)
    except Exception as exc:
        undo_compile()
        if plan.on_error == "raise":
            raise CompileError(f"{backend.name} compilation failed: {type(exc).__name__}: {first_line(exc)}; "
                               "fix the option named above, or use on_error=fallback / backend=eager") from exc
        report["backend_reason"] += "; compile failed"
        record_fallback(report, exc, "setup")
        return None
    report.update(info)
    if "precompiled" not in info:
        report["precompiled"] = {"used": False, "reason": f"backend={backend.name} has no precompiled blocks"}
    report["startup"].setdefault("cache", {})["precompiled_seconds"] = report["precompiled"].get("load_seconds", 0.0)
    if not info.get("compiled_modules"):
        return Handle(NAME, undo_compile, {})
    report["status"] = "compiled"
    report.setdefault("compilations", 0)
    report.setdefault("recompilations", 0)
    guard = GuardedForward(t, "forward", undo_compile, report, plan.on_error, backend.name,
                           fused=getattr(run, "fused", None))
    t.forward = guard
    runner = cudagraph.runner_of(t)
    if runner is not None:
        runner.before = guard.before_call
    return Handle(NAME, guard.remove, {})


def apply_vae(run: Run) -> Handle | None:
    """``compile_vae=true``: the VAE decoder too (end-to-end time); same fallback rules."""
    vae, plan, report = run.vae, run.plan, run.report
    if not (plan.compile_vae and vae is not None and run.backend.name == "inductor"
            and report.get("status") == "compiled"):
        return None
    decoder = vae.decoder
    decoder.compile(backend="inductor", options=run.backend.options(plan), dynamic=True if plan.dynamic else False)
    guard = GuardedForward(vae, "decode", lambda: tcompat.clear_compiled_call(decoder), report, plan.on_error, "vae")
    vae.decode = guard
    report["compiled_modules"] = report["compiled_modules"] + ["vae.decoder"]
    return Handle("compile_vae", guard.remove, {})


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
# The repeated layers of each encoder, compiled one by one (regional, like the transformer's blocks: identical
# layers share one graph, so T5-XXL's 24 layers compile about as fast as two).
_LAYERS = ("text_model.encoder.layers", "encoder.block")  # CLIPTextModel(WithProjection), T5EncoderModel


def _layers_of(encoder):
    """(dotted path, ModuleList) of the encoder's repeated layers (None: an encoder of unknown structure)."""
    for path in _LAYERS:
        m = encoder
        for part in path.split("."):
            m = getattr(m, part, None)
        if isinstance(m, torch.nn.ModuleList) and len(m):
            return path, m
    return None


def apply_text_encoders(run: Run) -> Handle | None:
    """``compile_text_encoders=true``: each text encoder's layers too (T5-XXL above all: end-to-end time);
    the encoder's ``forward`` is guarded like the VAE's ``decode`` (a compile failure runs it eagerly)."""
    plan, report = run.plan, run.report
    if not (plan.compile_text_encoders and run.target is not run.transformer and run.backend.name == "inductor"
            and report.get("status") == "compiled"):
        return None
    guards = []
    for attr in TEXT_ENCODERS:
        encoder = getattr(run.target, attr, None)
        found = _layers_of(encoder) if isinstance(encoder, torch.nn.Module) else None
        if found is None:
            continue
        path, layers = found
        for layer in layers:
            layer.compile(backend="inductor", options=run.backend.options(plan),
                          dynamic=True if plan.dynamic else False)

        def undo(layers=layers):
            for layer in layers:
                tcompat.clear_compiled_call(layer)
        guard = GuardedForward(encoder, "forward", undo, report, plan.on_error, attr)
        encoder.forward = guard
        guards.append(guard)
        report["compiled_modules"] = report["compiled_modules"] + [f"{attr}.{path}"]
    if not guards:
        return None

    def undo_all():
        for g in reversed(guards):
            g.remove()
    return Handle("compile_text_encoders", undo_all, {})
