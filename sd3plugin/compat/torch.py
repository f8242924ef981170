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
