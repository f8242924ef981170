"""The checks that need the machine: is the configured device there, can its GPU run the quant preset.

Composing a config never calls these (``sd3plugin-run --cfg job quant=fp8_...`` works on a laptop);
``check_hardware`` runs when a plan is applied to a model. torch is imported only when they run.
"""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from .parallel import check_parallel_process
from .quant_presets import fix_hint, needs_gpu_message, quant_preset
from .step_cache import check_step_cache_installed

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have fp8 tensor cores


def check_quant_device(name: str, device: str) -> None:
    """fp8 presets need CUDA with compute capability >= 8.9; raise a ConfigError naming what was found."""
    import torch

    if not quant_preset(name).fp8:
        return
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" or not torch.cuda.is_available():
        where = f"this run is on {device.upper()}" if device != "cuda" else "no CUDA GPU is visible to torch"
        raise ConfigError(needs_gpu_message(name, where))
    cap = torch.cuda.get_device_capability()
    if tuple(cap) < FP8_MIN_CAPABILITY:
        gpu = torch.cuda.get_device_name()
        raise ConfigError(f"quant={name} needs fp8 tensor cores (compute capability >= 8.9) but the GPU is "
                          f"{gpu} with compute capability {cap[0]}.{cap[1]}; {fix_hint(name)}")


def _quant_type(cfg_or_plan) -> str:
    quant = getattr(cfg_or_plan, "quant", None)
    if quant is None:
        return "none"
    return str(quant if isinstance(quant, str) else getattr(quant, "type", "none"))


def check_hardware(cfg_or_plan, device: Optional[str] = None) -> str:
    """Check a config (or a plan with ``device`` and ``quant``/``quant.type``) against this machine.

    ``device``: the device the plan runs on (default: the config's own, ``auto`` resolved). Raises
    ConfigError naming what is missing and the fix; returns the resolved device.
    """
    from .resolve import resolve_device

    device = str(device if device is not None else getattr(cfg_or_plan, "device", "auto"))
    if getattr(cfg_or_plan, "parallel", None) is not None:
        check_parallel_process(cfg_or_plan)  # a parallel config outside the ranks sd3plugin-run starts
    check_quant_device(_quant_type(cfg_or_plan), device)  # first: its message names the quant fix
    check_step_cache_installed(getattr(cfg_or_plan, "step_cache", None))
    return resolve_device(device)
