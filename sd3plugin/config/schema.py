"""Typed schema of the sd3plugin config (Hydra structured config).

The dataclasses give every key its type; ``conf/`` holds the YAML presets that compose on top of them.
``register()`` puts the schema in Hydra's ConfigStore under ``sd3plugin_schema`` (the first entry of
``conf/config.yaml``'s defaults list), so an unknown key or a wrong type fails at composition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

BACKENDS = ("auto", "inductor", "nexfort", "eager")
ON_ERROR = ("fallback", "raise")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
MEMORY_FORMATS = ("channels_last", "contiguous_format", "preserve")
ATTENTION = ("auto", "sdpa", "fa4", "int8", "int8_fp8")


@dataclass
class ModeConfig:
    """A compile mode: ``spec`` is a colon-separated token string, as in onediff/nexfort."""

    name: str = MISSING
    spec: str = ""
    description: str = ""


@dataclass
class MemoryFormatConfig:
    name: str = "channels_last"


@dataclass
class DynamicConfig:
    """``enabled``: mark height/width dynamic so new resolutions reuse one compiled graph."""

    enabled: bool = False
    # Dynamo's per-code-object recompile limit; static shapes recompile once per resolution.
    recompile_limit: int = 64


@dataclass
class QuantConfig:
    """Quantization preset (see docs/quantization.md); ``type: none`` leaves weights as they are."""

    type: str = "none"
    submodules_config_path: Optional[str] = None
    top_percentage: float = 100.0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class SD3PluginConfig:
    model: str = "tiny"
    backend: str = "auto"
    mode: ModeConfig = field(default_factory=ModeConfig)
    memory_format: MemoryFormatConfig = field(default_factory=MemoryFormatConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    # Extra options handed to the backend as they are (inductor config keys, nexfort options).
    backend_options: dict[str, Any] = field(default_factory=dict)
    fuse_qkv: bool = True
    fuse_gelu: bool = True
    # Attention kernel of the optimized transformer: auto (FA4 where it runs, else sdpa) | sdpa | fa4.
    attention: str = "auto"
    compile_vae: bool = False
    cache_dir: str = "${oc.env:SD3PLUGIN_CACHE_DIR,${oc.env:HOME,/tmp}/.cache/sd3plugin}"
    on_error: str = "fallback"
    device: str = "auto"
    dtype: str = "auto"
    # Run settings (sd3plugin-run, sd3plugin-bench, sd3plugin-cache warm/verify).
    prompt: str = "a photo of an astronaut riding a horse on the moon"
    negative_prompt: str = ""
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 28
    guidance_scale: float = 7.0
    seed: int = 0
    num_images: int = 1
    output_dir: Optional[str] = None


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sd3plugin_schema", node=SD3PluginConfig)
