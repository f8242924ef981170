"""FlashAttention-3's forward (package ``fa3-fwd``: FA3 on torch's stable ABI, sm_90a, CUDA 13; bf16 and fp8
e4m3 kernels, no fp16): the custom op ``sd3plugin::fa3_attention`` that torch.compile and CUDA graphs see as
one opaque call, its per-head fp8 quantization, a torch simulation of both, and why it cannot run.

- ``attention=fa3``: the bf16 kernel; an fp16 model's Q/K/V are converted to bf16 in the op and the output
  back to fp16.
- ``attention=fa3_fp8``: Q, K and V quantized to e4m3 before the op (``sd3plugin::fa3_attention_fp8``
  takes e4m3 tensors; the quantization is torch ops that inductor fuses into the kernels producing Q/K/V,
  the projections' epilogue), one scale per (batch, head): ``descale =
  amax / 448`` over that head's tokens and channels, so each head uses e4m3's whole range whatever the
  others' magnitude; FA3 multiplies the descales back in (Q.K^T by q x k, P.V by v). The kernel returns bf16,
  cast to the model's dtype. An fp16 model is quantized from fp16 directly. Quantization: opt-in.

On CPU (tests) the op runs ``reference_attention``, the same quantization simulated in torch, so the
processor's wiring and the scaling logic are tested without a GPU.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .availability import gpu_kernel_unavailable

FA3_INSTALL = 'pip install ".[fa3]" from a checkout (fa3-fwd)'
FP8_MAX = 448.0  # largest float8_e4m3fn value
_MIN_AMAX = 1e-12  # an all-zero head: scale stays finite, its values quantize to 0


@functools.lru_cache(maxsize=1)
def _fa3_func():
    from fa3_fwd_interface import flash_attn_func

    return flash_attn_func


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H, D) tensor -> (e4m3 tensor (B, S, H, D) contiguous, descale (B, H) float32), with
    ``x ~= x8 * descale[:, None, :, None]``; each (batch, head)'s largest |value| maps to 448. Plain torch
    ops (a reduction, then a multiply in float32 whose result is cast to e4m3), so that under torch.compile
    inductor fuses them with the kernels that produce Q/K/V (the projection's bias, split and layout)."""
    amax = x.abs().amax(dim=(1, 3)).float()
    descale = amax.clamp(min=_MIN_AMAX) / FP8_MAX
    x8 = (x.float() * descale.reciprocal()[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8.contiguous(), descale


def dequantize(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``quantize_per_head``'s inverse, in float32."""
    return x8.float() * descale[:, None, :, None]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> torch.Tensor:
    """What ``fa3_attention`` computes, simulated with torch ops on any device: Q/K/V quantized per (batch,
    head) and dequantized (``fp8``) or rounded to bf16, then float32 SDPA; output in q's dtype. The fp8
    kernel also rounds the softmax probabilities P to e4m3 before P.V, which this leaves out."""
    if fp8:
        qf, kf, vf = (dequantize(*quantize_per_head(t)) for t in (q, k, v))
    else:
        qf, kf, vf = (t.to(torch.bfloat16).float() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


# The schema is spelled out: with postponed annotations (this module's __future__ import) torch 2.4, the
# nexfort stack, cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::fa3_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool fp8) -> Tensor")
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> torch.Tensor:
    """Non-causal attention over (batch, seq, heads, head_dim) fp16/bf16 tensors, softmax scale
    1/sqrt(head_dim), output in q's dtype: FA3's bf16 kernel, or (``fp8``) its e4m3 kernel on Q/K/V
    quantized per (batch, head)."""
    if fp8:
        (q8, qd), (k8, kd), (v8, vd) = (quantize_per_head(t) for t in (q, k, v))
        return _fa3_fp8_kernel(q8, k8, v8, qd, kd, vd).to(q.dtype)
    else:
        out = _fa3_func()(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16))
    out = out[0] if isinstance(out, tuple) else out
    return out.to(q.dtype)


@fa3_attention.register_fake
def _(q, k, v, fp8):
    return q.new_empty(q.shape)  # FA3 writes a contiguous (B, S, H, D) output


@fa3_attention.register_kernel("cpu")
def _(q, k, v, fp8):
    return reference_attention(q, k, v, fp8)


def _fa3_fp8_kernel(q8, k8, v8, qd, kd, vd) -> torch.Tensor:
    out = _fa3_func()(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op("sd3plugin::fa3_attention_fp8", mutates_args=(),
                         schema="(Tensor q8, Tensor k8, Tensor v8, Tensor q_descale, Tensor k_descale, "
                                "Tensor v_descale, ScalarType out_dtype) -> Tensor")
def fa3_attention_fp8(q8, k8, v8, q_descale, k_descale, v_descale, out_dtype: torch.dtype) -> torch.Tensor:
    """FA3's e4m3 kernel on Q/K/V quantized already (``quantize_per_head``: (B, S, H, D) e4m3, (B, H)
    descales), output in ``out_dtype``: the quantization stays outside the opaque op, where inductor
    fuses it into the projections' epilogue."""
    return _fa3_fp8_kernel(q8, k8, v8, q_descale, k_descale, v_descale).to(out_dtype)


@fa3_attention_fp8.register_fake
def _(q8, k8, v8, q_descale, k_descale, v_descale, out_dtype):
    return q8.new_empty(q8.shape, dtype=out_dtype)


@fa3_attention_fp8.register_kernel("cpu")
def _(q8, k8, v8, q_descale, k_descale, v_descale, out_dtype):
    qf, kf, vf = (dequantize(t, d) for t, d in ((q8, q_descale), (k8, k_descale), (v8, v_descale)))
    out = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))
    return out.transpose(1, 2).to(out_dtype).contiguous()


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attention=fa3_fp8`` in the model: per-head quantization as torch ops (fused by inductor into the
    kernels that produce Q/K/V), then the opaque FA3 fp8 op. Same numbers as ``fa3_attention(..., True)``."""
    (q8, qd), (k8, kd), (v8, vd) = (quantize_per_head(t) for t in (q, k, v))
    return fa3_attention_fp8(q8, k8, v8, qd, kd, vd, q.dtype)


def fa3_unavailable(device: str, dtype: torch.dtype | None) -> str | None:
    """Why FA3 (``attention=fa3`` / ``fa3_fp8``) cannot run here (None if it can)."""
    return gpu_kernel_unavailable("FA3", device, dtype, lambda major, minor: (major, minor) == (9, 0),
                                  "compute capability 9.0 (fa3-fwd is built for sm_90a: H100 / H200 / H20)",
                                  _fa3_func, "fa3-fwd", FA3_INSTALL)
