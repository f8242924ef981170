"""PyTorch internals sd3plugin relies on (written against torch 2.4 - 2.13)."""
from __future__ import annotations

import torch


def graph_count() -> int:
    """How many graphs Dynamo compiled in this process so far (``counters["stats"]["unique_graphs"]``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def set_compiled_call(module: torch.nn.Module, fn) -> None:
    """What ``module(...)`` runs instead of its forward (``nn.Module.compile`` stores it here)."""
    module._compiled_call_impl = fn


def compiled_call(module: torch.nn.Module):
    return getattr(module, "_compiled_call_impl", None)


def clear_compiled_call(module: torch.nn.Module) -> None:
    module._compiled_call_impl = None


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs forward (pre-)hooks: its own or the global ones."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def plain_call(module: torch.nn.Module, *args, **kwargs):
    """The module's call without its compiled replacement (hooks included)."""
    return module._call_impl(*args, **kwargs)


def addmm_gelu_tanh(bias: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``gelu(bias + x @ weight_t, approximate="tanh")`` in cuBLASLt's epilogue (CUDA)."""
    return torch._addmm_activation(bias, x, weight_t, use_gelu=True)


def reset_dynamo() -> None:
    """Forget every compiled graph of this process (``torch._dynamo.reset``)."""
    import torch._dynamo

    torch._dynamo.reset()


# Timers of ``torch._dynamo.utils.compilation_time_metrics`` (``dynamo_timed``) the start-up breakdown reads.
DYNAMO_TIMER = "_compile.compile_inner"            # a frame's whole compile: tracing, guards, backend
BACKEND_TIMER = "OutputGraph.call_user_compiler"   # the backend (inductor: cache lookup or compile)
KERNEL_LOAD_TIMER = "PyCodeCache.load_by_key_path"  # loading a compiled module and its kernels
AUTOTUNE_TIMERS = ("CachingAutotuner.benchmark_all_configs", "CachingAutotuner.coordinate_descent_tuning")


def compile_metrics() -> dict:
    """``{timer: (seconds, count)}`` of Dynamo's compile timers so far in this process, and the counters
    the breakdown uses (``counters["inductor"]["coordesc_tuning_bench"]``, unique graphs)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:  # a torch without them: the breakdown says n/a
        return {}
    out = {k: (float(sum(v)), len(v)) for k, v in compilation_time_metrics.items()}
    out["#coordesc_benchmarks"] = (0.0, int(counters["inductor"]["coordesc_tuning_bench"]))
    out["#graphs"] = (0.0, int(counters["stats"]["unique_graphs"]))
    return out


def compile_breakdown(before: dict, after: dict) -> dict:
    """Where the time between two ``compile_metrics()`` snapshots went (seconds; counts)."""
    def delta(name, index=0):
        return after.get(name, (0.0, 0))[index] - before.get(name, (0.0, 0))[index]

    backend = delta(BACKEND_TIMER)
    kernels = delta(KERNEL_LOAD_TIMER)
    return {"dynamo_tracing_seconds": round(max(delta(DYNAMO_TIMER) - backend, 0.0), 3),
            "inductor_compile_seconds": round(max(backend - kernels, 0.0), 3),
            "kernel_loading_seconds": round(kernels, 3),
            "autotuning_seconds": round(sum(delta(t) for t in AUTOTUNE_TIMERS), 3),
            "autotuned_kernels": int(sum(delta(t, 1) for t in AUTOTUNE_TIMERS)),
            "coordesc_benchmarks": int(delta("#coordesc_benchmarks", 1)),
            "graphs_compiled": int(delta("#graphs", 1))}


def scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=torch.bfloat16, use_fast_accum: bool = False):
    """``torch._scaled_mm``: fp8 ``a`` (M, K) row-major times fp8 ``b`` (K, N) column-major, float32 scales
    (M, 1) and (1, N), optional bias, in ``out_dtype``."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)
