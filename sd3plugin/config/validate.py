"""Pure checks of a composed config: what Hydra's types cannot check. Never touches the hardware.

Choices, mode tokens, quant option consistency, numbers, the environment switches' values and the
resolution the model can take. Whether this machine can run the config is ``hardware.check_hardware``.
"""
from __future__ import annotations

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from . import schema
from .choices import ATTENTION_KERNELS, DEVICES, DTYPES, MEMORY_FORMATS, ON_ERROR
from .modes import parse_mode
from .parallel import check_parallel_config
from .quant_presets import check_quant_config
from .step_cache import check_step_cache_config

# Boolean keys whose default an environment variable sets (``VAR=0`` turns them off).
ENV_SWITCHES = {"joint_attention": "SD3PLUGIN_JOINT_ATTENTION", "fa4_prewarm": "SD3PLUGIN_FA4_PREWARM",
                "keep_coordesc": "SD3PLUGIN_KEEP_COORDESC", "precompiled": "SD3PLUGIN_PRECOMPILED"}


def choices() -> dict[str, tuple[str, ...]]:
    """Key -> valid values, for every key with fixed choices (backends read live: plugins add some)."""
    return {"backend": schema.BACKENDS, "on_error": ON_ERROR, "attention": ATTENTION_KERNELS,
            "device": DEVICES, "dtype": DTYPES, "memory_format.name": MEMORY_FORMATS}


def check_choice(key: str, value, valid) -> None:
    if str(value) not in valid:
        raise ConfigError(f"{key}={str(value)!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _check_env_switches(cfg: DictConfig) -> None:
    for key, var in ENV_SWITCHES.items():
        if key not in cfg:
            continue
        try:
            cfg[key]
        except OmegaConfBaseException:
            raise ConfigError(f"{key}: environment variable {var} must be 0 or 1 (or true/false), got an "
                              f"unusable value; unset it or set {key}=true|false") from None


FP8_FUSED_QUANT = "fp8_e4m3_e4m3_dynamic"


def check_fp8_fused_activation(cfg: DictConfig) -> None:
    """``fp8_fused_activation=true`` feeds torchao's per-row fp8 matmuls from sd3plugin's compiled blocks."""
    if not cfg.get("fp8_fused_activation", False):
        return
    if str(cfg.quant.type) != FP8_FUSED_QUANT:
        raise ConfigError(f"fp8_fused_activation=true quantizes activations for per-row fp8 matmuls, but "
                          f"quant={cfg.quant.type}; set quant={FP8_FUSED_QUANT}, or fp8_fused_activation=false")
    if str(cfg.backend) in ("eager", "nexfort"):
        raise ConfigError(f"fp8_fused_activation=true runs inside sd3plugin's compiled blocks, not with "
                          f"backend={cfg.backend}; use backend=inductor (or auto), or fp8_fused_activation=false")
    if cfg.get("lora_hotswap_rank") is not None:
        raise ConfigError("fp8_fused_activation=true bypasses the quantized layers' forward, where LoRA "
                          "hot-swapping adds its adapters; unset lora_hotswap_rank, or set fp8_fused_activation=false")


def validate(cfg: DictConfig) -> DictConfig:
    """Check values Hydra's types cannot: choices, mode tokens, quant options, shapes. Raises ConfigError."""
    for key, valid in choices().items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        check_choice(key, node, valid)
    tokens = parse_mode(cfg.mode.spec)
    check_quant_config(cfg.quant, tokens, device=cfg.device, dtype=cfg.dtype)
    for key in ("steps", "num_images"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    for key in ("height", "width"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive number of pixels")
    rank = cfg.get("lora_hotswap_rank")
    if rank is not None and rank < 1:
        raise ConfigError(f"lora_hotswap_rank={rank} must be at least 1 (the largest LoRA rank to hot-swap), "
                          "or null to turn hot-swapping off")
    _check_env_switches(cfg)
    check_fp8_fused_activation(cfg)
    if "parallel" in cfg:
        check_parallel_config(cfg)
    if "step_cache" in cfg:
        check_step_cache_config(cfg)
    from ..models import check_resolution  # lazy: models sits above config; the check reads tables only

    check_resolution(cfg.model, cfg.height, cfg.width)
    return cfg
