"""The feed-forward's first matmul with its GELU in the matmul's epilogue (``fuse_gelu=true``).

SD3's feed-forwards compute ``gelu(x @ W1^T + b1, approximate="tanh")``: 4x the hidden size wide, the
largest activations of the step. Compiled, that is a cuBLAS matmul and then a Triton pass that reads and
writes the whole 4x-wide output again for bias and GELU (about 1.6 ms of a 39 ms SD3-medium step on an H100).
cuBLASLt can apply bias and tanh-GELU in the matmul's epilogue instead (``torch._addmm_activation``), so the
pass disappears. The call is a custom op, ``sd3plugin::linear_gelu_tanh``: inductor would otherwise split it
back into a matmul and a pointwise kernel.

``fuse_gelu(transformer)`` routes every tanh-GELU projection with plain (not quantized) weights through it
and returns an undo callable; a projection that later stops being a plain ``nn.Linear`` (a LoRA loaded on it)
runs diffusers' own forward. On CPU the op computes the same function without the epilogue (CPU's
``_addmm_activation`` uses the exact GELU, not the tanh approximation SD3 was trained with).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compat import torch as tcompat


# The schema is spelled out: with postponed annotations torch 2.4 cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::linear_gelu_tanh", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def linear_gelu_tanh(x, weight, bias):
    """``gelu(x @ weight^T + bias, approximate="tanh")``; on CUDA in one cuBLASLt call."""
    if x.device.type != "cuda":
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    flat = x.reshape(-1, x.shape[-1])
    out = tcompat.addmm_gelu_tanh(bias, flat, weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fusable(module) -> bool:
    proj = getattr(module, "proj", None)
    return (type(module).__name__ == "GELU" and getattr(module, "approximate", None) == "tanh"
            and type(proj) is torch.nn.Linear and proj.bias is not None
            and type(proj.weight) is torch.nn.Parameter and type(proj.weight.data) is torch.Tensor)


def _fused_forward(module):
    def forward(hidden_states):
        proj = module.proj  # looked up at each call: a LoRA (PEFT layer) or a quantized weight runs as diffusers
        if type(proj) is torch.nn.Linear and type(proj.weight.data) is torch.Tensor:
            return linear_gelu_tanh(hidden_states, proj.weight, proj.bias)
        return type(module).forward(module, hidden_states)

    return forward


def fuse_gelu(transformer):
    """Route each tanh-GELU projection with plain weights through ``linear_gelu_tanh``; quantized
    projections keep their own matmul. Returns an undo callable (``undo.fused`` = how many)."""
    patched = [m for m in transformer.modules() if _fusable(m)]
    for m in patched:
        m.forward = _fused_forward(m)

    def undo():
        for m in patched:
            m.__dict__.pop("forward", None)

    undo.fused = len(patched)
    return undo
