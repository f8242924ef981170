"""Attention kernels for the SD3 transformer: one processor, a choice of kernel (``attention=``).

``SD3AttnProcessor`` computes exactly what diffusers' ``JointAttnProcessor2_0`` computes (joint image +
text attention, SD3.5's RMS q/k norm, the MMDiT-X image-only second attention) and also runs on fused
Q/K/V projections *with* the q/k norm, which diffusers' fused processor drops. It keeps tokens in
(batch, seq, heads, head_dim) order and hands them to one kernel:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (torch picks cuDNN / flash / efficient);
- ``fa4``: FlashAttention-4's CuTe kernels (package ``flash-attn-4``; Hopper and Blackwell GPUs), called
  through the custom op ``sd3plugin::fa4_attention`` so torch.compile and CUDA graphs see one opaque call;
- ``auto``: ``fa4`` where it can run (CUDA, compute capability 9.x/10.x, fp16/bf16, package importable),
  else ``sdpa``; the reason goes into ``report(pipe)["attention"]``;
- ``int8`` / ``int8_fp8``: 8-bit attention (int8 Q.K^T; P.V in 16 bits or in fp8), a Triton kernel in
  ``sd3plugin.quantized_attention``. Quantization: opt-in, never picked by ``auto``.

``set_attention(transformer, kernel)`` installs the processor on every SD3 attention module and returns
an undo callable that puts the original processors back.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from . import fa4_prewarm, joint_attention, quantized_attention
from .errors import ConfigError

log = logging.getLogger("sd3plugin")
from .config.choices import ATTENTION_KERNELS as KERNELS  # noqa: E402  (the one table of kernels)
PV_OF = {"int8": "16bit", "int8_fp8": "fp8"}  # the 8-bit kernels and how each multiplies P by V
FA4_INSTALL = 'pip install "sd3plugin[fa4]" (flash-attn-4 and nvidia-cutlass-dsl)'


# --- the FA4 kernel as a custom op ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fa4_func():
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


# The schema is spelled out: with postponed annotations (this module's __future__ import) torch 2.4, the
# nexfort stack, cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::fa4_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v) -> Tensor")
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention over (batch, seq, heads, head_dim) tensors, softmax scale 1/sqrt(head_dim)."""
    fa4_prewarm.wait_pending()  # a child compiling this kernel: load its result instead of compiling again
    out = _fa4_func()(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@fa4_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def fa4_cache_dir() -> str | None:
    """Where the imported flash-attn-4 keeps compiled kernels on disk (None: in memory only). It reads
    FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED/DIR once, at import."""
    from flash_attn.cute import cache_utils

    return cache_utils.CUTE_DSL_CACHE_DIR if cache_utils.CUTE_DSL_CACHE_ENABLED else None


def fa4_cache_flags(path: str) -> dict[str, object]:
    """Settings that point an already imported flash-attn-4's persistent kernel cache at ``path`` (for
    ``GLOBAL_SETTINGS.set_flag``, so ``disable()`` and each pipeline's scoped calls get theirs). FA4 reads
    its cache directory once, at import, and fixes each kernel cache's folder then; a process that
    optimizes a second pipeline with another cache_dir (the benchmark's variants) would otherwise keep
    writing kernels into the first one's, which may be deleted. Empty when FA4 is not imported yet (the
    environment variables decide) or keeps kernels in memory only."""
    import sys
    from pathlib import Path

    utils, iface = sys.modules.get("flash_attn.cute.cache_utils"), sys.modules.get("flash_attn.cute.interface")
    if utils is None or iface is None or not getattr(utils, "CUTE_DSL_CACHE_ENABLED", False):
        return {}
    try:
        root = Path(utils.CUTE_DSL_CACHE_DIR) if utils.CUTE_DSL_CACHE_DIR else utils.get_cache_path()
        flags: dict[str, object] = {"flash_attn.cute.cache_utils:CUTE_DSL_CACHE_DIR": path}
        for name, fn in sorted(vars(iface).items()):
            cache = getattr(fn, "compile_cache", None)
            if isinstance(getattr(cache, "cache_path", None), Path):
                new = Path(path) / cache.cache_path.relative_to(root)
                new.mkdir(parents=True, exist_ok=True)
                flags[f"flash_attn.cute.interface:{name}.compile_cache.cache_path"] = new
        return flags
    except (AttributeError, TypeError, ValueError, OSError) as exc:  # another flash-attn-4 layout
        log.warning("sd3plugin: cannot point flash-attn-4's kernel cache at %s (%s)", path, exc)
        return {}


def fa4_unavailable(device: str, dtype: torch.dtype | None) -> str | None:
    """Why FA4 cannot run here (None if it can)."""
    if device != "cuda" or not torch.cuda.is_available():
        return "FA4 needs a CUDA GPU (this run is on CPU)"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return (f"FA4 needs compute capability 9.x or 10.x (Hopper/Blackwell); "
                f"{torch.cuda.get_device_name()} is {major}.{minor}")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 runs float16/bfloat16 only, the transformer is {str(dtype).replace('torch.', '')}"
    try:
        _fa4_func()
    except Exception as exc:  # ImportError, or a broken cutlass-dsl install
        return f"flash-attn-4 does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); {FA4_INSTALL}"
    return None


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
    """(kernel, reason) for ``attention=name``; ConfigError for an unknown name or an fa4 that cannot run."""
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
    why = fa4_unavailable(device, dtype)
    if name == "fa4":
        if why:
            raise ConfigError(f"attention=fa4 cannot run: {why}. Use attention=auto or attention=sdpa")
        return "fa4", "attention=fa4"
    if why:
        return "sdpa", f"auto: sdpa ({why})"
    return "fa4", f"auto: fa4 (FlashAttention-4 on {torch.cuda.get_device_name()})"


# --- the processor ----------------------------------------------------------------------------------


def _attend(kernel: str, q, k, v):
    """q, k, v: (B, S, H, D) -> (B, S, H, D)."""
    if kernel == "fa4":
        return fa4_attention(q.contiguous(), k.contiguous(), v.contiguous())
    if kernel in PV_OF:
        return quantized_attention.attend(q, k, v, PV_OF[kernel])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _project(attn, x, fused, names, norms):
    """Q, K, V of ``x`` as (B, S, H, D), through one fused matmul where fused, q/k norms applied."""
    b = x.shape[0]
    if fused is not None:
        q, k, v = fused(x).chunk(3, dim=-1)
    else:
        q, k, v = (getattr(attn, n)(x) for n in names)
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
        self.kernel = kernel
        # one op for projections + attention + output projections, no copies (sd3plugin.joint_attention);
        # with FA4, which reads Q/K/V as strided views. On other kernels only for tests (it runs SDPA).
        if joint is None:
            joint = kernel == "fa4" and os.environ.get("SD3PLUGIN_JOINT_ATTENTION") != "0"
        self.joint = joint

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("SD3 joint attention takes no attention_mask")
        if self.joint and joint_attention.applies(attn, encoder_hidden_states):
            return joint_attention.run(attn, hidden_states, encoder_hidden_states)
        n_img = hidden_states.shape[1]
        q, k, v = _project(attn, hidden_states, getattr(attn, "to_qkv", None), ("to_q", "to_k", "to_v"),
                           (attn.norm_q, attn.norm_k))
        if encoder_hidden_states is not None:
            cq, ck, cv = _project(attn, encoder_hidden_states, getattr(attn, "to_added_qkv", None),
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


# --- installing it ----------------------------------------------------------------------------------


def _sd3_attention_modules(transformer):
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, Attention)]


def _fused_linear(parts: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One Linear holding ``parts`` stacked; the parts become views of it, so fusing costs no memory and
    the state dict keeps its keys and values. Built on the meta device: no random init of a big matrix."""
    grad = parts[0].weight.requires_grad
    w = torch.cat([p.weight.detach() for p in parts])
    b = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    fused = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    fused.weight = torch.nn.Parameter(w, requires_grad=grad)
    if b is not None:
        fused.bias = torch.nn.Parameter(b, requires_grad=grad)
    start = 0
    for lin in parts:
        n = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(w[start:start + n], requires_grad=grad)
        if b is not None:
            lin.bias = torch.nn.Parameter(b[start:start + n], requires_grad=grad)
        start += n
    return fused


def fuse_projections(transformer) -> bool:
    """Fuse each attention's Q/K/V (and the context's) into one matmul; True if any was fused.
    Exact with SD3AttnProcessor, SD3.5's q/k norm included (applied after the split)."""
    fused = False
    for _, m in _sd3_attention_modules(transformer):
        if getattr(m, "to_qkv", None) is not None or getattr(m, "is_cross_attention", False):
            continue
        m.to_qkv = _fused_linear([m.to_q, m.to_k, m.to_v])
        if getattr(m, "add_q_proj", None) is not None:
            m.to_added_qkv = _fused_linear([m.add_q_proj, m.add_k_proj, m.add_v_proj])
        m.fused_projections = True
        fused = True
    return fused


def unfuse_projections(transformer) -> None:
    """Drop the fused projections (the separate ones hold the same values)."""
    for _, m in _sd3_attention_modules(transformer):
        for name in ("to_qkv", "to_added_qkv"):
            if hasattr(m, name):
                delattr(m, name)
        m.fused_projections = False


# Processors SD3AttnProcessor computes exactly; any other (IP-Adapter, PAG, a user's own) is left in place.
REPLACEABLE = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "SD3AttnProcessor")


def set_attention(transformer, kernel: str):
    """Install SD3AttnProcessor(kernel) where the module runs one of diffusers' joint processors (others,
    such as IP-Adapter's, stay); return a callable that puts the original processors back."""
    originals = {name: m.processor for name, m in _sd3_attention_modules(transformer)
                 if type(m.processor).__name__ in REPLACEABLE}
    proc = SD3AttnProcessor(kernel)
    for name, m in _sd3_attention_modules(transformer):
        if name in originals:
            m.set_processor(proc)

    def undo():
        for name, m in _sd3_attention_modules(transformer):
            if name in originals:
                m.set_processor(originals[name])

    undo.replaced = len(originals)  # how many attention modules run the chosen kernel
    return undo


def joint_op_modules(transformer) -> int:
    """How many joint attentions run as one op (``sd3plugin.joint_attention``): SD3AttnProcessor with
    ``joint`` on a module it applies to (fused, unquantized projections, no q/k norm)."""
    return sum(1 for _, m in _sd3_attention_modules(transformer)
               if isinstance(m.processor, SD3AttnProcessor) and m.processor.joint
               and getattr(m, "added_kv_proj_dim", None) is not None and joint_attention.applies(m, True))
