"""Typed schema of the sd3plugin config (Hydra structured config), every key a COMPILE or a RUN key.

A compile key changes the compiled graphs or kernels: its value is part of the cache fingerprint
(``sd3plugin.cache.manifest.fingerprint``). A run key only changes a run (prompt, steps, where files go...).
``compile_keys()`` and ``run_keys()`` list the dotted leaf keys, derived from the dataclasses below.

``conf/config.yaml`` composes on top of the schema, ``conf/mode/*.yaml`` are the mode presets; the
``quant``, ``memory_format``, ``dynamic``, ``parallel`` and ``step_cache`` groups are generated from tables (``config/presets.py``).
``register()`` puts the schema (``sd3plugin_schema``) and those groups in Hydra's ConfigStore, so an
unknown key or a wrong type fails at composition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from omegaconf import MISSING

from .choices import (ATTENTION_KERNELS, DEVICES, DTYPES, MEMORY_FORMATS, ON_ERROR, Attention, Device,  # noqa: F401
                      Dtype, MemoryFormat, OnError)

# The one table of backend names. sd3plugin.backends registers its backends under these names and adds
# a plugin backend's new name here (config never imports backends). ``auto`` picks one of the others.
BACKENDS = ("auto", "inductor", "nexfort", "eager")
ATTENTION = ATTENTION_KERNELS  # name kept from before the tables moved to choices.py


def _env_flag(var: str) -> str:
    """Default of a boolean key that an environment variable may switch off (``VAR=0``)."""
    return "${oc.env:" + var + ",true}"


_UNSET = dataclasses.MISSING


def compile_field(default=_UNSET, *, default_factory=_UNSET):
    """A key whose value changes the compiled graphs (part of the cache fingerprint)."""
    return field(default=default, default_factory=default_factory, metadata={"compile": True})


def run_field(default=_UNSET, *, default_factory=_UNSET):
    """A key that only changes a run; compiled artefacts are shared across its values."""
    return field(default=default, default_factory=default_factory, metadata={"compile": False})


def group_field(cls):
    """A nested group of keys (each of them classified itself)."""
    return field(default_factory=cls, metadata={"group": True})


@dataclass
class ModeConfig:
    """A compile mode: ``spec`` is a colon-separated token string, as in onediff/nexfort."""

    name: str = run_field(MISSING)
    spec: str = compile_field("")
    description: str = run_field("")


@dataclass
class MemoryFormatConfig:
    name: MemoryFormat = compile_field(MemoryFormat.channels_last)


@dataclass
class DynamicConfig:
    """``enabled``: mark height/width dynamic so new resolutions reuse one compiled graph."""

    enabled: bool = compile_field(False)
    # Dynamo's per-code-object recompile limit; static shapes recompile once per resolution.
    recompile_limit: int = compile_field(64)


@dataclass
class QuantConfig:
    """Quantization preset (see docs/quantization.md); ``type: none`` leaves weights as they are."""

    type: str = compile_field("none")
    submodules_config_path: Optional[str] = compile_field(None)
    top_percentage: float = compile_field(100.0)
    include: list[str] = compile_field(default_factory=list)
    exclude: list[str] = compile_field(default_factory=list)


@dataclass
class ParallelConfig:
    """One image on several GPUs through xDiT (docs/parallel.md); the world size is
    ``(2 if cfg) x ulysses x ring x pipefusion``, 1 (``parallel=none``): one process, no xDiT."""

    name: str = run_field("none")
    cfg: bool = compile_field(False)
    ulysses: int = compile_field(1)
    ring: int = compile_field(1)
    pipefusion: int = compile_field(1)
    patches: Optional[int] = compile_field(None)  # PipeFusion's patch count (None: one per stage)
    launch: str = run_field("auto")  # auto: start the ranks | print: print the command that does


@dataclass
class StepCacheConfig:
    """Step caching through cache-dit (docs/step-cache.md); ``name: none`` computes every step (exact) and
    ignores the other keys. Each key is a cache-dit knob (``config/step_cache.py``)."""

    name: str = compile_field("none")
    fn: int = compile_field(8)              # blocks always computed first (DBCache's Fn)
    bn: int = compile_field(0)              # blocks always computed last (Bn)
    threshold: float = compile_field(0.0)   # residual difference under which the middle blocks are reused
    warmup: int = compile_field(8)          # steps always computed first
    max_cached: int = compile_field(-1)     # most steps reused per image (-1: no limit)
    max_continuous: int = compile_field(-1)  # most steps reused in a row (-1: no limit)
    taylorseer_order: int = compile_field(0)  # TaylorSeer forecast of the reused residual (0: off)


@dataclass
class SD3PluginConfig:
    model: str = compile_field("tiny")
    backend: str = compile_field("auto")  # one of BACKENDS (a plugin may add one): checked by validate()
    mode: ModeConfig = group_field(ModeConfig)
    memory_format: MemoryFormatConfig = group_field(MemoryFormatConfig)
    dynamic: DynamicConfig = group_field(DynamicConfig)
    quant: QuantConfig = group_field(QuantConfig)
    parallel: ParallelConfig = group_field(ParallelConfig)
    step_cache: StepCacheConfig = group_field(StepCacheConfig)
    # Extra options handed to the backend as they are (inductor config keys, nexfort options).
    backend_options: dict[str, Any] = compile_field(default_factory=dict)
    fuse_qkv: bool = compile_field(True)
    fuse_gelu: bool = compile_field(True)
    # Attention kernel of the optimized transformer: auto (the fastest measured 16-bit kernel that runs, else
    # sdpa) | sdpa | fa4 | fa3 | fa3_fp8 | 8-bit.
    attention: Attention = compile_field(Attention.auto)
    # With attention=fa4: SD3's joint attention as one op without copies (False: separate ops).
    joint_attention: bool = compile_field(_env_flag("SD3PLUGIN_JOINT_ATTENTION"))
    compile_vae: bool = compile_field(False)
    # The text encoders' layers too (CLIP-L, CLIP-G, T5-XXL; regional): their share of the end-to-end time.
    compile_text_encoders: bool = compile_field(False)
    # With quant=fp8_e4m3_e4m3_dynamic: the blocks' norm + modulation and GELU write e4m3 rows + per-row scales
    # for the fp8 matmuls (one Triton kernel each) instead of torchao's separate quantization passes.
    fp8_fused_activation: bool = compile_field(False)
    # Prepare for LoRA hot-swapping up to this rank without recompiling (None: no hot-swapping).
    lora_hotswap_rank: Optional[int] = compile_field(None)
    device: Device = compile_field(Device.auto)
    dtype: Dtype = compile_field(Dtype.auto)
    cache_dir: str = run_field("${oc.env:SD3PLUGIN_CACHE_DIR,${oc.env:HOME,/tmp}/.cache/sd3plugin}")
    on_error: OnError = run_field(OnError.fallback)
    # Compile FlashAttention-4's kernel in a child process during compilation (False: at its first call).
    fa4_prewarm: bool = run_field(_env_flag("SD3PLUGIN_FA4_PREWARM"))
    # Reuse cached coordinate-descent tuning results at a warm start.
    keep_coordesc: bool = run_field(_env_flag("SD3PLUGIN_KEEP_COORDESC"))
    # Run the precompiled transformer blocks of the cache entry when they match (False: Dynamo traces).
    precompiled: bool = run_field(_env_flag("SD3PLUGIN_PRECOMPILED"))
    # Run settings (sd3plugin-run, sd3plugin-bench, sd3plugin-cache warm/verify).
    prompt: str = run_field("a photo of an astronaut riding a horse on the moon")
    negative_prompt: str = run_field("")
    height: Optional[int] = run_field(None)
    width: Optional[int] = run_field(None)
    steps: int = run_field(28)
    guidance_scale: float = run_field(7.0)
    seed: int = run_field(0)
    num_images: int = run_field(1)
    output_dir: Optional[str] = run_field(None)
    # The file sd3plugin-run writes the image to (more images: numbered siblings); None: output_dir/image_NN.png.
    image_path: Optional[str] = run_field(None)


def top_level_keys() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(SD3PluginConfig))


def leaf_fields(cls=SD3PluginConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every leaf key of the schema, groups expanded, in schema order."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            yield from leaf_fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def is_compile_key(f: dataclasses.Field) -> bool:
    """True for a compile key; a field that is neither marked compile nor run is a schema error."""
    if "compile" not in f.metadata:
        raise TypeError(f"schema field {f.name!r} is not classified: declare it with compile_field() or run_field()")
    return bool(f.metadata["compile"])


def compile_keys() -> tuple[str, ...]:
    """Dotted keys whose values change the compiled graphs: what the cache fingerprint hashes."""
    return tuple(key for key, f in leaf_fields() if is_compile_key(f))


def run_keys() -> tuple[str, ...]:
    return tuple(key for key, f in leaf_fields() if not is_compile_key(f))


def free_form_keys() -> tuple[str, ...]:
    """Keys holding a free-form mapping: any key below them is accepted (``+backend_options.x=1``)."""
    return tuple(key for key, f in leaf_fields() if _is_dict_type(f.type))


def _is_dict_type(tp) -> bool:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.startswith(("dict", "Dict"))


def is_known_key(key: str) -> bool:
    """Whether ``key`` (dotted) names a key or group of the schema, or lies below a free-form mapping."""
    leaves = {k for k, _ in leaf_fields()}
    groups = {f.name for f in dataclasses.fields(SD3PluginConfig) if f.metadata.get("group")}
    return (key in leaves or key in groups
            or any(key.startswith(f"{free}.") for free in free_form_keys()))


def register() -> None:
    """Store the schema and the generated preset groups in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from .presets import register_generated_groups

    cs = ConfigStore.instance()
    cs.store(name="sd3plugin_schema", node=SD3PluginConfig)
    register_generated_groups(cs)
