"""SD3's joint attention without copies around the kernel: projections, attention and output projections in
one custom op (``sd3plugin::joint_attention``), used with FlashAttention-4 on blocks without q/k norm.

Compiled the ordinary way, a joint attention writes the image and the context Q/K/V projections to two
tensors, then copies them into one sequence per Q, K and V (split + concatenate), and after attention copies
the image and context halves out again for their output projections: about 1.9 ms of pure data movement in
a 37 ms SD3-medium step on an H100 (``scripts/step_profile.py``). Here each batch element's projections write
straight into their rows of one (batch, image + context tokens, 3 x inner) buffer, the attention kernel
reads Q, K and V as strided views of it, and the output projections read their rows of its result: the
same matmuls, no copies.

FlashAttention-4 runs on CUDA; elsewhere (tests on CPU) the op uses torch's SDPA, so its wiring is tested
without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fa4 import call_fa4


def _attend(q, k, v):
    """(B, S, H, D) views -> (B, S, H, D) contiguous."""
    if q.device.type == "cuda":
        return call_fa4(q, k, v)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# The schema is spelled out: with postponed annotations torch 2.4 cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::joint_attention", mutates_args=(),
                         schema="(Tensor x, Tensor c, Tensor w_qkv, Tensor b_qkv, Tensor w_cqkv, Tensor b_cqkv, "
                                "Tensor w_out, Tensor b_out, Tensor? w_cout, Tensor? b_cout, int heads) "
                                "-> (Tensor, Tensor)")
def joint_attention(x, c, w_qkv, b_qkv, w_cqkv, b_cqkv, w_out, b_out, w_cout, b_cout, heads):
    """Image tokens ``x`` (B, Si, dim) and context tokens ``c`` (B, Sc, dim_c) -> (image output (B, Si, dim),
    context output (B, Sc, dim_c), or the context's attention output (B, Sc, inner) when ``w_cout`` is None:
    the last block of SD3 has no context output projection)."""
    x, c = x.contiguous(), c.contiguous()
    b, si, sc, n = x.shape[0], x.shape[1], c.shape[1], w_qkv.shape[0]
    inner = n // 3
    buf = x.new_empty(b, si + sc, n)
    for i in range(b):
        torch.addmm(b_qkv, x[i], w_qkv.t(), out=buf[i, :si])
        torch.addmm(b_cqkv, c[i], w_cqkv.t(), out=buf[i, si:])
    q, k, v = buf.view(b, si + sc, 3, heads, inner // heads).unbind(2)
    o = _attend(q, k, v).reshape(b, si + sc, inner)
    img = x.new_empty(b, si, w_out.shape[0])
    for i in range(b):
        torch.addmm(b_out, o[i, :si], w_out.t(), out=img[i])
    if w_cout is None:
        return img, o[:, si:].contiguous()
    ctx = x.new_empty(b, sc, w_cout.shape[0])
    for i in range(b):
        torch.addmm(b_cout, o[i, si:], w_cout.t(), out=ctx[i])
    return img, ctx


@joint_attention.register_fake
def _(x, c, w_qkv, b_qkv, w_cqkv, b_cqkv, w_out, b_out, w_cout, b_cout, heads):
    ctx_dim = w_cout.shape[0] if w_cout is not None else w_qkv.shape[0] // 3
    return x.new_empty((x.shape[0], x.shape[1], w_out.shape[0])), x.new_empty((c.shape[0], c.shape[1], ctx_dim))


def _plain(linear) -> bool:
    return (type(linear) is torch.nn.Linear and linear.bias is not None
            and type(linear.weight.data) is torch.Tensor)


def applies(attn, encoder_hidden_states) -> bool:
    """Whether ``attn`` can run as one op: joint attention with fused, unquantized projections and no q/k
    norm (SD3; SD3.5's RMS q/k norm keeps the ordinary path)."""
    return (encoder_hidden_states is not None
            and all(getattr(attn, n, None) is None for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
            and all(_plain(getattr(attn, n, None)) for n in ("to_qkv", "to_added_qkv"))
            and _plain(attn.to_out[0]) and (attn.context_pre_only or _plain(getattr(attn, "to_add_out", None))))


def run(attn, hidden_states, encoder_hidden_states):
    """The processor's result for ``attn`` through ``joint_attention``."""
    cout = None if attn.context_pre_only else attn.to_add_out
    img, ctx = joint_attention(hidden_states, encoder_hidden_states, attn.to_qkv.weight, attn.to_qkv.bias,
                               attn.to_added_qkv.weight, attn.to_added_qkv.bias,
                               attn.to_out[0].weight, attn.to_out[0].bias,
                               None if cout is None else cout.weight, None if cout is None else cout.bias,
                               attn.heads)
    return attn.to_out[1](img), ctx
