"""Activation quantization fused into the kernel that produces the activation: one pass instead of three.

With ``quant=fp8_e4m3_e4m3_dynamic`` torchao quantizes every linear layer's input per row at each call:
a reduction pass (``amax`` of ``|x|`` per row), then a pass that divides by ``amax / 448``, clamps and casts
to e4m3. The input itself was written by another pass just before: SD3's LayerNorm + modulation
(``norm(x) * (1 + scale) + shift``, AdaLayerNormZero) for the attention's Q/K/V and the feed-forward's
first matmul, tanh-GELU for its second. Here one Triton kernel per producer does all of it in one read of
its input and one write of the e4m3 values and the per-row scales:

- ``norm_modulate_quantize(x, shift, scale)``: (B, S, D) 16-bit ``x``, (B, D) ``shift``/``scale`` ->
  (B*S, D) e4m3 and (B*S, 1) float32 scales;
- ``gelu_quantize(h)``: (M, N) 16-bit -> tanh-GELU(h) in e4m3 and (M, 1) float32 scales;
- ``scaled_linear(x8, x_scale, w8, w_scale, bias, out_dtype)``: what the quantized linear layer then runs
  (``torch._scaled_mm`` with per-row scales, through ``compat.torch``).

Numerics, exactly: the row's values are quantized from float32, where torchao quantizes the 16-bit tensor
the producer stored (rounded to bf16 first). So the e4m3 values can differ from torchao's by one e4m3 step
where the bf16 rounding moved a value across a rounding boundary, and the scale by bf16's rounding of the
row maximum (relative 2^-8); both are below the e4m3 rounding itself (relative 2^-4), and the fused result
is the closer one to the unquantized activation. The scale is ``max(amax, 1e-12) / 448`` (an all-zero row
quantizes to zeros), values are multiplied by ``448 / amax`` (a reciprocal, not a division: the same to
within float32 rounding before the cast) and clamped to +-448.

Needs Triton (a CUDA GPU, or the CPU interpreter with ``TRITON_INTERPRET=1`` for tests); ``reference_*``
are the unfused torch formulations the kernels are tested against.
"""
from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
MIN_AMAX = 1e-12
LN_EPS = 1e-6  # SD3's AdaLayerNormZero / AdaLayerNormContinuous: LayerNorm without affine, eps 1e-6


def _row_quantize(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows -> e4m3 and float32 (rows, 1) scales, as the kernels do."""
    amax = y.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX)
    q = (y * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_MAX


def reference_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                            eps: float = LN_EPS) -> torch.Tensor:
    """The unfused producer in float32: LayerNorm (no affine) then ``* (1 + scale) + shift`` per sample."""
    xf = x.float()
    y = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    return y * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]


def reference_norm_modulate_quantize(x, shift, scale, eps: float = LN_EPS):
    """What ``norm_modulate_quantize`` computes, with torch ops (any device)."""
    return _row_quantize(reference_norm_modulate(x, shift, scale, eps).reshape(-1, x.shape[-1]))


def reference_gelu_quantize(h: torch.Tensor):
    return _row_quantize(torch.nn.functional.gelu(h.float(), approximate="tanh"))


def torchao_style_quantize(a: torch.Tensor):
    """The separate passes as torchao runs them today: the producer's 16-bit output, ``amax`` per row,
    divide by ``amax / 448``, clamp, cast (for comparisons)."""
    af = a.float()
    s = af.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (af / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s


@functools.lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels, built on first use (importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_mod_quant(X, SHIFT, SCALE, Q, QS, S, D, eps, BLOCK: tl.constexpr, STORE_F32: tl.constexpr):
        row = tl.program_id(0)
        b = row // S
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        sh = tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * (1.0 + sc) + sh
        y = tl.where(mask, y, 0.0)
        amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
        q = tl.minimum(tl.maximum(y * (448.0 / amax), -448.0), 448.0)
        if STORE_F32:  # the CPU interpreter: the cast happens in torch (see _interpreted)
            tl.store(Q + row * D + cols, q, mask=mask)
        else:
            tl.store(Q + row * D + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(QS + row, amax / 448.0)

    @triton.jit
    def _gelu_quant(H, Q, QS, N, BLOCK: tl.constexpr, STORE_F32: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        h = tl.load(H + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        # tanh(u) = 1 - 2 / (exp(2u) + 1), exact at both ends of the float32 range
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        y = tl.where(mask, 0.5 * h * (1.0 + t), 0.0)
        amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12)
        q = tl.minimum(tl.maximum(y * (448.0 / amax), -448.0), 448.0)
        if STORE_F32:
            tl.store(Q + row * N + cols, q, mask=mask)
        else:
            tl.store(Q + row * N + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(QS + row, amax / 448.0)

    return _norm_mod_quant, _gelu_quant


def _interpreted() -> bool:
    """Triton's CPU interpreter (tests). Its float32 -> e4m3 cast is wrong (127.4 becomes 64, not 128; from
    float16 too), so there the kernel stores the scaled, clamped float32 values and torch casts them with
    round-to-nearest-even, what the GPU's ``cvt.rn.satfinite`` does in the kernel."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(n)))


def norm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = LN_EPS):
    """(B, S, D) ``x``, (B, D) ``shift`` / ``scale`` -> ((B*S, D) e4m3, (B*S, 1) float32 scales), one pass."""
    B, S, D = x.shape
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    f32 = _interpreted()
    q = torch.empty(B * S, D, dtype=torch.float32 if f32 else torch.float8_e4m3fn, device=x.device)
    qs = torch.empty(B * S, 1, dtype=torch.float32, device=x.device)
    kernel = _kernels()[0]
    kernel[(B * S,)](x, shift, scale, q, qs, S, D, eps, BLOCK=_block(D), STORE_F32=f32,
           num_warps=8 if D > 2048 else 4)
    return (q.to(torch.float8_e4m3fn) if f32 else q), qs


def gelu_quantize(h: torch.Tensor):
    """(M, N) 16-bit ``h`` (a matmul's output with its bias) -> (tanh-GELU(h) in e4m3, (M, 1) scales)."""
    h = h.contiguous()
    M, N = h.shape
    f32 = _interpreted()
    q = torch.empty(M, N, dtype=torch.float32 if f32 else torch.float8_e4m3fn, device=h.device)
    qs = torch.empty(M, 1, dtype=torch.float32, device=h.device)
    kernel = _kernels()[1]
    kernel[(M,)](h, q, qs, N, BLOCK=_block(N), STORE_F32=f32, num_warps=16 if N > 4096 else 8)
    return (q.to(torch.float8_e4m3fn) if f32 else q), qs


def scaled_linear(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x @ w.T + bias`` from e4m3 ``x8`` (M, K) with (M, 1) scales and e4m3 ``w8`` (N, K) with (N, 1)
    scales (torchao's per-row weights), in ``out_dtype``."""
    from ..compat import torch as tcompat

    return tcompat.scaled_mm(x8, w8.t(), x_scale, w_scale.t(), bias, out_dtype)


# --- as custom ops: what the model calls (sd3plugin.kernels.fp8_block) ------------------------------------
# Opaque to torch.compile (one extern call each, no graph break); on CPU they run the Triton kernel in the
# interpreter when TRITON_INTERPRET=1 (tests), else the torch reference (same numbers up to the cast).


@torch.library.custom_op("sd3plugin::fp8_norm_modulate_quantize", mutates_args=(),
                         schema="(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)")
def norm_modulate_quantize_op(x, shift, scale, eps):
    return norm_modulate_quantize(x, shift, scale, eps)


@norm_modulate_quantize_op.register_fake
def _(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    return (x.new_empty((rows, x.shape[2]), dtype=torch.float8_e4m3fn),
            x.new_empty((rows, 1), dtype=torch.float32))


@norm_modulate_quantize_op.register_kernel("cpu")
def _(x, shift, scale, eps):
    if _interpreted():
        return norm_modulate_quantize(x, shift, scale, eps)
    return reference_norm_modulate_quantize(x, shift, scale, eps)


@torch.library.custom_op("sd3plugin::fp8_gelu_quantize", mutates_args=(), schema="(Tensor h) -> (Tensor, Tensor)")
def gelu_quantize_op(h):
    return gelu_quantize(h)


@gelu_quantize_op.register_fake
def _(h):
    return h.new_empty(h.shape, dtype=torch.float8_e4m3fn), h.new_empty((h.shape[0], 1), dtype=torch.float32)


@gelu_quantize_op.register_kernel("cpu")
def _(h):
    return gelu_quantize(h) if _interpreted() else reference_gelu_quantize(h)
