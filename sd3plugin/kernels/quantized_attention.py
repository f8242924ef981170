"""8-bit attention for the SD3 transformer (``attention=int8`` / ``attention=int8_fp8``): one Triton kernel.

Why: with 16-bit attention the fastest kernel on an H100 (FlashAttention-4) reaches ~370-420 TFLOP/s at
SD3's head size (64), and attention is ~40% of a compiled SD3 step. 8-bit tensor cores run twice as fast.

How (SageAttention's recipe):

- ``quantize_qkv`` (plain torch ops, so torch.compile fuses it into the projections that produce Q/K/V):
  K is smoothed (its mean over tokens subtracted: softmax ignores a per-query constant, and K's outlier
  channels lose their offset); Q gets one int8 scale per token and head, K one per block of ``BLOCK_N``
  tokens and head. With ``pv="fp8"`` V gets one e4m3 scale per channel and head and is stored transposed
  (B, H, D, S), the order fp8 tensor cores read it in; with ``pv="16bit"`` V is left as it is.
- the kernel: FlashAttention's online softmax. Scores are dequantized with one multiply per element (row
  scale x block scale x softmax scale x log2 e). For fp8 P.V, P is scaled by 448 before its cast (e4m3's
  whole range instead of [0, 1]) at no cost, by shifting the running maximum by log2(448).

It is quantization, so it is opt-in and its error is reported next to its speed (``scripts/attn_bench.py``
for the kernel, ``sd3plugin-bench`` for the pipeline). Needs Triton and a CUDA GPU (fp8 P.V: compute
capability 8.9 or newer).
"""
from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
INT8_MAX = 127.0
BLOCK_N = 128  # K is scaled per block of this many tokens; the kernel walks K/V in blocks of this size
LOG2E = 1.4426950408889634
PV_TYPES = ("fp8", "16bit")


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp8"):
    """(B, S, H, D) 16-bit tensors -> 8-bit tensors and float32 scales for ``attention_quantized``.

    Q.K^T runs in int8 (3-4x less error than e4m3 at the same speed): Q gets one scale per token and head,
    K (smoothed: its mean over tokens subtracted, which softmax ignores) one per block of ``BLOCK_N`` tokens
    and head. ``pv="fp8"``: V gets one scale per channel and head and is stored transposed in e4m3;
    ``pv="16bit"``: V stays as it is (scale 1).

    Returns qi (B, S, H, D) int8, q_scale (B, S, H), ki (B, S_pad, H, D) int8, k_scale (B, S_pad / BLOCK_N,
    H), v (fp8: (B, H, D, S_pad); 16bit: (B, S, H, D)), v_scale (B, H, D); S_pad rounds S up to BLOCK_N."""
    if pv not in PV_TYPES:
        raise ValueError(f"pv must be one of {PV_TYPES}, got {pv!r}")
    b, s, h, d = k.shape
    qa = q.float()
    q_scale = qa.abs().amax(dim=-1).clamp(min=1e-8) / INT8_MAX
    qi = (qa / q_scale[..., None]).round().to(torch.int8)
    pad = (-s) % BLOCK_N
    ka = k.float()
    ka = torch.nn.functional.pad(ka - ka.mean(dim=1, keepdim=True), (0, 0, 0, 0, 0, pad))
    kb = ka.view(b, (s + pad) // BLOCK_N, BLOCK_N, h, d)
    k_scale = kb.abs().amax(dim=(2, 4)).clamp(min=1e-8) / INT8_MAX
    ki = (kb / k_scale[:, :, None, :, None]).round().to(torch.int8).view(b, s + pad, h, d)
    if pv == "16bit":
        return qi, q_scale, ki, k_scale, v.contiguous(), torch.ones(b, h, d, device=v.device)
    va = v.float()
    v_scale = va.abs().amax(dim=1).clamp(min=1e-8) / FP8_MAX
    vt = (va / v_scale[:, None]).to(torch.float8_e4m3fn).permute(0, 2, 3, 1)
    vt = torch.nn.functional.pad(vt.view(torch.uint8), (0, pad)).view(torch.float8_e4m3fn).contiguous()
    return qi, q_scale, ki, k_scale, vt, v_scale


def triton_version() -> tuple[int, int]:
    """Triton's (major, minor); the kernel is tested with 3.6 (GPU) and 3.9 (CPU interpreter)."""
    import triton

    major, minor = (triton.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.lru_cache(maxsize=2)
def _kernel(tuned: bool = True):
    """The Triton kernel, built on first use (importing this module needs no Triton); ``tuned`` wraps it in
    Triton's autotuner (block size, warps, pipeline stages; once per sequence length and head size)."""
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
               for bm in (64, 128) for w in (4, 8) for st in (2, 3, 4) if not (bm == 64 and w == 8)]

    @triton.jit
    def _fwd(Q, QS, K, KS, VT, VS, O, N_CTX, N_FULL, N_PAD, H: tl.constexpr, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        b = off_bh // H
        h = off_bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < N_CTX
        # Q: (B, S, H, D); scales (B, S, H)
        q_ptrs = Q + ((b * N_CTX + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        qs = tl.load(QS + (b * N_CTX + offs_m) * H + h, mask=row_ok, other=0.0) * qk_scale
        # K: (B, S_pad, H, D) read as (D, BLOCK_N) tiles; K scales (B, S_pad / BLOCK_N, H)
        k_ptrs = K + ((b * N_PAD + offs_n[None, :]) * H + h) * HEAD_DIM + offs_d[:, None]
        ks_ptr = KS + (b * (N_PAD // BLOCK_N)) * H + h
        if PV_FP8:  # V^T: (B, H, D, S_pad) read as (BLOCK_N, D) tiles
            v_ptrs = VT + ((b * H + h) * HEAD_DIM + offs_d[None, :]) * N_PAD + offs_n[:, None]
            v_step = 1
            P_SHIFT: tl.constexpr = 8.807354922057604  # log2(448): P is stored as p * 448, e4m3's range
        else:  # V: (B, S, H, D), 16-bit
            v_ptrs = VT + ((b * N_CTX + offs_n[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
            v_step = H * HEAD_DIM
            P_SHIFT: tl.constexpr = 0.0
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, N_FULL, BLOCK_N):  # full blocks: no masks
            k = tl.load(k_ptrs + start_n * H * HEAD_DIM)
            ks = tl.load(ks_ptr + (start_n // BLOCK_N) * H)
            s = tl.dot(q, k).to(tl.float32) * (qs * ks)[:, None]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - (m_new - P_SHIFT)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_ptrs + start_n * v_step)
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        if N_FULL < N_CTX:  # the last, partial block: padded keys get -inf scores
            start_n = N_FULL
            col_ok = (start_n + offs_n) < N_CTX
            k = tl.load(k_ptrs + start_n * H * HEAD_DIM)
            ks = tl.load(ks_ptr + (start_n // BLOCK_N) * H)
            s = tl.dot(q, k).to(tl.float32) * (qs * ks)[:, None]
            s = tl.where(col_ok[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - (m_new - P_SHIFT)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if PV_FP8:
                v = tl.load(v_ptrs + start_n)
            else:
                v = tl.load(v_ptrs + start_n * v_step, mask=col_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        vs = tl.load(VS + (b * H + h) * HEAD_DIM + offs_d)
        out = acc / l_i[:, None] * vs[None, :]
        o_ptrs = O + ((b * N_CTX + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])

    if not tuned:
        return _fwd
    try:  # Triton >= 3.2 keeps the tuned choice in its cache directory (sd3plugin's cache_dir ships it)
        return triton.autotune(configs=configs, key=["N_CTX", "HEAD_DIM", "PV_FP8"], cache_results=True)(_fwd)
    except TypeError:
        return triton.autotune(configs=configs, key=["N_CTX", "HEAD_DIM", "PV_FP8"])(_fwd)


def attention_quantized(qf, q_scale, kf, k_scale, vt, v_scale, out_dtype: torch.dtype,
                        block_m: int | None = None) -> torch.Tensor:
    """The kernel on ``quantize_qkv``'s outputs; returns (B, S, H, D) in ``out_dtype``. ``block_m`` fixes
    the query block size instead of autotuning (the Triton interpreter, used by the CPU tests, has no
    autotuner)."""
    import triton

    b, s, h, d = qf.shape
    n_pad = kf.shape[1]
    out = torch.empty(b, s, h, d, device=qf.device, dtype=out_dtype)
    args = (qf, q_scale, kf, k_scale, vt, v_scale, out, s, s - s % BLOCK_N, n_pad, h, LOG2E / math.sqrt(d))
    consts = dict(HEAD_DIM=d, BLOCK_N=BLOCK_N, PV_FP8=vt.dtype == torch.float8_e4m3fn)
    if block_m is None:
        _kernel(True)[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h)](*args, **consts)
    else:
        _kernel(False)[(triton.cdiv(s, block_m), b * h)](*args, BLOCK_M=block_m, **consts)
    return out


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp8",
                   block_m: int | None = None) -> torch.Tensor:
    """Non-causal attention over (B, S, H, D) fp16/bf16 tensors with int8 Q.K^T and ``pv`` P.V (fp8 or
    16-bit), softmax scale 1/sqrt(D)."""
    return attention_quantized(*quantize_qkv(q, k, v, pv), out_dtype=q.dtype, block_m=block_m)


# The schema is spelled out: with postponed annotations torch 2.4 cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::int8_attention", mutates_args=(),
                         schema="(Tensor qi, Tensor q_scale, Tensor ki, Tensor k_scale, Tensor v, Tensor v_scale, "
                                "ScalarType out_dtype) -> Tensor")
def int8_attention_op(qi, q_scale, ki, k_scale, v, v_scale, out_dtype):
    """``attention_quantized`` as one opaque call for torch.compile and CUDA graphs."""
    return attention_quantized(qi.contiguous(), q_scale.contiguous(), ki.contiguous(), k_scale.contiguous(),
                               v.contiguous(), v_scale.contiguous(), out_dtype)


@int8_attention_op.register_fake
def _(qi, q_scale, ki, k_scale, v, v_scale, out_dtype):
    return qi.new_empty(qi.shape, dtype=out_dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str) -> torch.Tensor:
    """What SD3AttnProcessor calls: quantization in torch ops (compiled with the model), then the kernel."""
    return int8_attention_op(*quantize_qkv(q, k, v, pv), q.dtype)
