"""``device=auto`` and ``dtype=auto`` made concrete for this machine (torch imported when called)."""
from __future__ import annotations

from ..errors import ConfigError
from . import quant_presets


def resolve_device(name: str) -> str:
    """``auto``: CUDA if torch sees a GPU, else CPU. ``cuda`` without a GPU is a ConfigError."""
    import torch

    name = str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible to torch; use device=cpu or device=auto")
    return name


def resolve_dtype(name: str, device: str, quant: str = "none"):
    """``auto``: what the quant preset needs (bfloat16 for per-row fp8), else float16 on CUDA, float32 on CPU.
    Returns a ``torch.dtype``."""
    import torch

    name, quant = str(name), str(quant)
    if name == "auto":
        needed = quant_presets.preferred_dtype(quant) if quant != "none" else None
        if needed:
            return getattr(torch, needed)
        return torch.float16 if str(device) == "cuda" else torch.float32
    return getattr(torch, name)
