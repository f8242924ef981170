"""Attention kernels for the SD3 transformer: one processor, a choice of kernel (``attention=``).

``SD3AttnProcessor`` computes exactly what diffusers' ``JointAttnProcessor2_0`` computes (joint image +
text attention, SD3.5's RMS q/k norm, the MMDiT-X image-only second attention) and also runs on fused
Q/K/V projections *with* the q/k norm, which diffusers' fused processor drops. It keeps tokens in
(batch, seq, heads, head_dim) order and hands them to one kernel:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (torch picks cuDNN / flash / efficient);
- ``fa4``: FlashAttention-4's CuTe kernels (package ``flash-attn-4``; Hopper and Blackwell GPUs), called
  through the custom op ``sd3plugin::fa4_attention`` so torch.compile and CUDA graphs see one opaque call;
- ``fa3``: FlashAttention-3's bf16 forward (package ``fa3-fwd``; compute capability 9.0), through the custom
  op ``sd3plugin::fa3_attention`` (``sd3plugin.kernels.fa3``); an fp16 model's Q/K/V are converted to bf16;
- ``fa3_fp8``: FA3's fp8 e4m3 forward on Q/K/V quantized per (batch, head) by torch ops before the op
  ``sd3plugin::fa3_attention_fp8`` (inductor fuses them into the kernels producing Q/K/V). Quantization: opt-in,
  never picked by ``auto``;
- ``auto``: the first kernel of ``AUTO_PICKS[(compute capability major, dtype)]`` (the fastest measured
  there, docs/performance.md "attention=auto picks") that can run here, else ``sdpa``; the reason goes into
  ``report(pipe)["attention"]``;
- ``int8`` / ``int8_fp8``: 8-bit attention (int8 Q.K^T; P.V in 16 bits or in fp8), a Triton kernel in
  ``sd3plugin.quantized_attention``. Quantization: opt-in, never picked by ``auto``.

With ``fp8_fused_activation`` (``sd3plugin.kernels.fp8_block``) the processor receives a block's normalized
activations as e4m3 rows + per-row scales (``Fp8Rows``) and projects them with fp8 matmuls.

The processor runs an attention's fused projections (``to_qkv``, ``to_added_qkv``) only while
``uses_fused(attn)`` says so (``sd3plugin.transforms.fuse_qkv`` keeps that exact: a LoRA on ``to_q`` makes the
attention run its separate projections). ``sd3plugin.transforms.attention`` installs the processor.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from ..compat import diffusers as dcompat
from ..config.choices import ATTENTION_KERNELS as KERNELS  # one table: the config's
from ..errors import ConfigError
from . import fp8_block, joint_attention, quantized_attention
from .fa3 import (FA3_INSTALL, fa3_attention, fa3_fp8_attention,  # noqa: F401  (FA3_INSTALL: re-exported)
                  fa3_unavailable)
from .fa4 import FA4_INSTALL, fa4_attention, fa4_unavailable  # noqa: F401  (FA4_INSTALL: re-exported)

log = logging.getLogger("sd3plugin")
PV_OF = {"int8": "16bit", "int8_fp8": "fp8"}  # the 8-bit kernels and how each multiplies P by V
FA3_FP8 = {"fa3": False, "fa3_fp8": True}  # the FA3 kernels and whether each quantizes to fp8

# What attention=auto tries, by (compute capability major, dtype): the 16-bit kernels measured faster than
# sdpa there, fastest first; the first that can run is used, else sdpa. Quantized kernels are never here.
# Measured on an H200 at SD3-medium's joint shape (docs/benchmarks/README.md#attention-kernels): fp16 FA4
# 0.459 ms (FA3 has no fp16 kernel), bf16 FA4 0.454 ms, FA3 0.472 ms, cuDNN SDPA 0.582 ms. Blackwell: FA4
# (not measured here). docs/performance.md renders this table ("attention=auto picks").
AUTO_PICKS = {
    (9, "float16"): ("fa4",),
    (9, "bfloat16"): ("fa4", "fa3"),
    (10, "float16"): ("fa4",),
    (10, "bfloat16"): ("fa4",),
}
_AUTO_NAMES = {"fa4": "FlashAttention-4", "fa3": "FlashAttention-3, bf16"}
_UNAVAILABLE = {"fa4": fa4_unavailable, "fa3": fa3_unavailable}


def int8_unavailable(kernel: str, device: str, dtype: torch.dtype | None) -> str | None:
    """Why the 8-bit kernel ``kernel`` cannot run here (None if it can)."""
    if device != "cuda" or not torch.cuda.is_available():
        return f"attention={kernel} needs a CUDA GPU (this run is on CPU)"
    need = (8, 9) if kernel == "int8_fp8" else (8, 0)
    cap = torch.cuda.get_device_capability()
    if cap < need:
        return (f"attention={kernel} needs compute capability {need[0]}.{need[1]} or newer; "
                f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"attention={kernel} takes float16/bfloat16 tensors, the transformer is {str(dtype).replace('torch.', '')}"
    if importlib.util.find_spec("triton") is None:
        return f"attention={kernel} needs Triton 3.6 or newer (pip install triton)"
    version = quantized_attention.triton_version()
    if version < (3, 6):
        return f"attention={kernel} needs Triton 3.6 or newer (the version it is tested with); this is {version[0]}.{version[1]}"
    return None


def resolve_kernel(name: str, device: str, dtype: torch.dtype | None) -> tuple[str, str]:
    """(kernel, reason) for ``attention=name``; ConfigError for an unknown name or a named kernel that
    cannot run here (``auto`` falls back to ``sdpa`` instead)."""
    if name not in KERNELS:
        raise ConfigError(f"attention={name!r} is not a kernel; valid: {', '.join(KERNELS)}")
    if name == "sdpa":
        return "sdpa", "attention=sdpa (torch's scaled_dot_product_attention)"
    if name in PV_OF:
        why = int8_unavailable(name, device, dtype)
        if why:
            alt = "attention=int8 or attention=auto" if name == "int8_fp8" and "capability" in why else "attention=auto"
            raise ConfigError(f"{why}. Use {alt}")
        pv = "fp8" if name == "int8_fp8" else "16-bit"
        return name, f"attention={name} (8-bit attention: int8 Q.K^T, {pv} P.V; Triton)"
    if name in ("fa4", *FA3_FP8):
        why = (fa4_unavailable if name == "fa4" else fa3_unavailable)(device, dtype)
        if why:
            raise ConfigError(f"attention={name} cannot run: {why}. Use attention=auto or attention=sdpa")
        detail = {"fa3": " (FlashAttention-3, bf16)",
                  "fa3_fp8": " (FlashAttention-3 fp8 e4m3, one scale per batch and head)"}.get(name, "")
        return name, f"attention={name}{detail}"
    return _auto(device, dtype)


def _auto(device: str, dtype: torch.dtype | None) -> tuple[str, str]:
    if device != "cuda" or not torch.cuda.is_available():
        return "sdpa", f"auto: sdpa ({fa4_unavailable(device, dtype)})"
    major, minor = torch.cuda.get_device_capability()
    dtype_name = str(dtype).replace("torch.", "")
    order = AUTO_PICKS.get((major, dtype_name), ())
    skipped = []  # why each faster kernel cannot run
    for kernel in order:
        why = _UNAVAILABLE[kernel](device, dtype)
        if why is None:
            tried = "".join(f"; {s}" for s in skipped)
            return kernel, f"auto: {kernel} ({_AUTO_NAMES[kernel]} on {torch.cuda.get_device_name()}{tried})"
        skipped.append(why)
    if not order:
        skipped = [f"no kernel measured faster than sdpa on compute capability {major}.{minor} with {dtype_name}"]
    return "sdpa", f"auto: sdpa ({'; '.join(skipped)})"


# --- the processor ----------------------------------------------------------------------------------


def _attend(kernel: str, q, k, v):
    """q, k, v: (B, S, H, D) -> (B, S, H, D)."""
    if kernel == "fa4":
        return fa4_attention(q.contiguous(), k.contiguous(), v.contiguous())
    if kernel == "fa3_fp8":
        return fa3_fp8_attention(q, k, v)
    if kernel in FA3_FP8:
        return fa3_attention(q, k, v, FA3_FP8[kernel])
    if kernel in PV_OF:
        return quantized_attention.attend(q, k, v, PV_OF[kernel])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


FUSED_FLAG = "_sd3plugin_fused"


def uses_fused(attn) -> bool:
    """Whether ``attn`` runs its fused projections now (set by sd3plugin.transforms.fuse_qkv)."""
    return bool(getattr(attn, FUSED_FLAG, False)) and getattr(attn, "to_qkv", None) is not None


def _project(attn, x, fused, names, norms):
    """Q, K, V of ``x`` as (B, S, H, D), through one fused matmul where fused, q/k norms applied."""
    b = x.shape[0]
    if fused is not None:
        q, k, v = fp8_block.linear(fused, x).chunk(3, dim=-1)
    else:
        q, k, v = (fp8_block.linear(getattr(attn, n), x) for n in names)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, head_dim) for t in (q, k, v))
    norm_q, norm_k = norms
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


class SD3AttnProcessor:
    """Joint attention of SD3 / SD3.5 blocks with a selectable kernel (see module docstring)."""

    def __init__(self, kernel: str = "sdpa", joint: bool | None = None):
        if kernel not in KERNELS or kernel == "auto":
            raise ValueError(f"kernel must be one of {', '.join(KERNELS[1:])}, got {kernel!r}")
        # one op for projections + attention + output projections, no copies (sd3plugin.joint_attention);
        # it calls FA4, which reads Q/K/V as strided views (SDPA on CPU: with kernel="sdpa" for tests only).
        if joint and kernel not in ("fa4", "sdpa"):
            raise ValueError(f"joint=True runs FlashAttention-4 (the joint-attention op); kernel {kernel!r} "
                             "takes the ordinary path")
        self.kernel = kernel
        self.joint = kernel == "fa4" if joint is None else joint

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("SD3 joint attention takes no attention_mask")
        fused = uses_fused(attn)
        if self.joint and fused and not isinstance(hidden_states, fp8_block.Fp8Rows) \
                and joint_attention.applies(attn, encoder_hidden_states):
            return joint_attention.run(attn, hidden_states, encoder_hidden_states)
        n_img = hidden_states.shape[1]
        q, k, v = _project(attn, hidden_states, attn.to_qkv if fused else None, ("to_q", "to_k", "to_v"),
                           (attn.norm_q, attn.norm_k))
        if encoder_hidden_states is not None:
            cq, ck, cv = _project(attn, encoder_hidden_states, attn.to_added_qkv if fused else None,
                                  ("add_q_proj", "add_k_proj", "add_v_proj"),
                                  (attn.norm_added_q, attn.norm_added_k))
            q, k, v = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
        out = _attend(self.kernel, q, k, v)
        out = out.reshape(out.shape[0], out.shape[1], -1).to(q.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


# --- what runs where ---------------------------------------------------------------------------------


def joint_op_modules(transformer) -> int:
    """How many joint attentions run as one op (``sd3plugin.joint_attention``): SD3AttnProcessor with
    ``joint`` on a module it applies to (fused, unquantized projections, no q/k norm)."""
    return sum(1 for _, m in dcompat.attention_modules(transformer)
               if isinstance(m.processor, SD3AttnProcessor) and m.processor.joint and uses_fused(m)
               and getattr(m, "added_kv_proj_dim", None) is not None and joint_attention.applies(m, True))
