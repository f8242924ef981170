"""``Plan``: a composed config resolved once for this machine (device, dtype, mode tokens), passed down.

``make_plan(cfg)`` is the only place that turns config values into what transforms and backends use; it
touches the hardware only to resolve ``device=auto``. Backends receive the same object.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .config import check_hardware, parse_mode
from .config.resolve import resolve_dtype


@dataclass
class Plan:
    mode_spec: str
    tokens: tuple[str, ...]
    device: str                      # "cpu" or "cuda"
    dynamic: bool
    recompile_limit: int
    memory_format: str
    cache_dir: str
    options: dict = field(default_factory=dict)   # backend_options, passed to the backend as they are
    backend: str = "auto"
    dtype: torch.dtype | None = None
    attention: str = "auto"
    fuse_qkv: bool = True
    fuse_gelu: bool = True
    joint_attention: bool = True
    compile_vae: bool = False
    compile_text_encoders: bool = False
    fp8_fused_activation: bool = False
    quant: Any = None                # the quant config node (type, layer selection)
    on_error: str = "fallback"
    fa4_prewarm: bool = True
    precompiled: bool = True         # load precompiled transformer blocks (backends/precompiled.py)
    lora_hotswap_rank: int | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    cfg_guidance: bool = True        # classifier-free guidance doubles the batch
    step_cache: Any = None           # the step_cache config node (None or name none: off)
    cfg: DictConfig | None = None    # the composed config it came from (for the report)

    @property
    def quant_type(self) -> str:
        return str(self.quant.type) if self.quant is not None else "none"


def _get(cfg, key, default):
    value = cfg.get(key, default) if isinstance(cfg, DictConfig) else getattr(cfg, key, default)
    return default if value is None else value


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of ``cfg`` on this machine; ConfigError when the hardware cannot run it (fp8 on an old GPU...)."""
    device = check_hardware(cfg)
    return Plan(
        mode_spec=cfg.mode.spec, tokens=parse_mode(cfg.mode.spec), device=device,
        dynamic=bool(cfg.dynamic.enabled), recompile_limit=int(cfg.dynamic.recompile_limit),
        memory_format=cfg.memory_format.name, cache_dir=str(cfg.cache_dir),
        options=copy.deepcopy(OmegaConf.to_container(cfg.backend_options, resolve=True)),
        backend=str(cfg.backend), dtype=resolve_dtype(cfg.dtype, device, cfg.quant.type),
        attention=str(cfg.attention), fuse_qkv=bool(cfg.fuse_qkv), fuse_gelu=bool(_get(cfg, "fuse_gelu", True)),
        joint_attention=bool(_get(cfg, "joint_attention", True)), compile_vae=bool(cfg.compile_vae),
        compile_text_encoders=bool(_get(cfg, "compile_text_encoders", False)),
        fp8_fused_activation=bool(_get(cfg, "fp8_fused_activation", False)),
        quant=cfg.quant, on_error=str(cfg.on_error), fa4_prewarm=bool(_get(cfg, "fa4_prewarm", True)),
        precompiled=bool(_get(cfg, "precompiled", True)),
        lora_hotswap_rank=_get(cfg, "lora_hotswap_rank", None), height=cfg.height, width=cfg.width,
        num_images=int(cfg.num_images), cfg_guidance=float(cfg.guidance_scale) > 1,
        step_cache=cfg.get("step_cache") if isinstance(cfg, DictConfig) else getattr(cfg, "step_cache", None),
        cfg=cfg)
