"""FlashAttention-4 (package ``flash-attn-4``; Hopper and Blackwell GPUs): loading it, the custom op
``sd3plugin::fa4_attention`` that torch.compile and CUDA graphs see as one opaque call, and why it cannot run.
Its kernel cache's internals are behind ``sd3plugin.compat.flash_attn``."""
from __future__ import annotations

import functools
import time

import torch

from ..compat import flash_attn as facompat
from . import fa4_prewarm
from .availability import gpu_kernel_unavailable

FA4_INSTALL = 'pip install ".[fa4]" from a checkout (flash-attn-4 and nvidia-cutlass-dsl)'


# What loading FA4 cost this process (report(pipe)["startup"]["attention_kernel"]): the import of the CuTe DSL
# and the first call of each shape (JIT compile, or loading the kernel from FA4's cache).
STATS = {"import_seconds": None, "first_call_seconds": 0.0, "shapes": 0}
_SEEN: set = set()


@functools.lru_cache(maxsize=1)
def _fa4_func():
    t0 = time.perf_counter()
    from flash_attn.cute import flash_attn_func

    STATS["import_seconds"] = round(time.perf_counter() - t0, 3)
    return flash_attn_func


def call_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FA4 on (B, S, H, D) tensors; the first call of each shape is timed (it compiles or loads the kernel)."""
    fa4_prewarm.wait_pending()  # a child compiling this kernel: load its result instead of compiling again
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.stride(), k.stride())
    if key in _SEEN:
        out = _fa4_func()(q, k, v)
    else:
        fn = _fa4_func()
        t0 = time.perf_counter()
        out = fn(q, k, v)
        _SEEN.add(key)
        STATS["first_call_seconds"] = round(STATS["first_call_seconds"] + time.perf_counter() - t0, 3)
        STATS["shapes"] += 1
    return out[0] if isinstance(out, tuple) else out


# The schema is spelled out: with postponed annotations (this module's __future__ import) torch 2.4, the
# nexfort stack, cannot infer it from the signature.
@torch.library.custom_op("sd3plugin::fa4_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v) -> Tensor")
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention over (batch, seq, heads, head_dim) tensors, softmax scale 1/sqrt(head_dim)."""
    return call_fa4(q, k, v)


@fa4_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def fa4_cache_dir() -> str | None:
    """Where the imported flash-attn-4 keeps compiled kernels on disk (None: in memory only)."""
    return facompat.cache_dir()


def fa4_cache_flags(path: str) -> dict[str, object]:
    """Settings that point an already imported flash-attn-4's kernel cache at ``path`` (see compat)."""
    return facompat.cache_flags(path)


def fa4_unavailable(device: str, dtype: torch.dtype | None) -> str | None:
    """Why FA4 cannot run here (None if it can)."""
    return gpu_kernel_unavailable("FA4", device, dtype, lambda major, minor: major in (9, 10),
                                  "compute capability 9.x or 10.x (Hopper/Blackwell)", _fa4_func, "flash-attn-4",
                                  FA4_INSTALL)


