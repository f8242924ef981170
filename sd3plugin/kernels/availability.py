"""Why a GPU attention kernel cannot run here: the checks FA3 and FA4 share."""
from __future__ import annotations

from typing import Callable

import torch


def gpu_kernel_unavailable(name: str, device: str, dtype: torch.dtype | None, capability_ok: Callable[[int, int], bool],
                           needs: str, load: Callable[[], object], package: str, install: str) -> str | None:
    """None when kernel ``name`` runs here; else one line saying why (CPU, GPU generation, dtype, import)."""
    if device != "cuda" or not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU (this run is on CPU)"
    major, minor = torch.cuda.get_device_capability()
    if not capability_ok(major, minor):
        return f"{name} needs {needs}; {torch.cuda.get_device_name()} is {major}.{minor}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"{name} runs float16/bfloat16 models only, the transformer is {str(dtype).replace('torch.', '')}"
    try:
        load()
    except Exception as exc:  # ImportError, or a broken install (another CUDA, torch or cutlass-dsl)
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"{package} does not import ({type(exc).__name__}: {first}); {install}"
    return None
