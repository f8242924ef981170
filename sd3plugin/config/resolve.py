"""Resolve ``device`` and ``dtype`` config values (``auto``) for this machine."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible to torch; use device=cpu or device=auto")
    return name


def resolve_dtype(name: str, device: str, quant: str = "none") -> torch.dtype:
    """``auto``: what the quant preset needs (bfloat16 for per-row fp8), else float16 on CUDA, float32 on CPU."""
    if name == "auto":
        from ..quant import preferred_dtype

        needed = preferred_dtype(quant) if quant != "none" else None
        if needed:
            return getattr(torch, needed)
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)
