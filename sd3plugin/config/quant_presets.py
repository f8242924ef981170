"""The quantization presets (one table) and the config-time checks of the ``quant`` keys.

``QUANT_PRESETS`` is the only list of presets: the ``quant`` config group is generated from it
(``config/presets.py``) and ``sd3plugin.quant.PRESETS`` adds each preset's torchao config to it.
``check_quant_config`` is pure: it reads the config (and the JSON file it names), never the hardware;
``config/hardware.py`` checks the GPU when the plan is applied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

MAX_SUBMODULES_BYTES = 64 * 2**20  # quant.submodules_config_path (a JSON file)


@dataclass(frozen=True)
class QuantPreset:
    """One preset: what it does and what it needs from the hardware."""

    name: str
    description: str
    fp8: bool = False
    needs_bfloat16: bool = False  # torchao's per-row fp8 takes bfloat16 weights only
    nexfort_quant_type: Optional[str] = None
    default_include: tuple = ()  # fnmatch patterns of the default selection; () means quant.DEFAULT_INCLUDE
    torchao: str = ""  # the torchao config it builds (documentation)


QUANT_PRESETS: dict[str, QuantPreset] = {p.name: p for p in (
    QuantPreset("none", "no quantization"),
    QuantPreset("fp8_e4m3_e4m3_dynamic",
                "fp8 e4m3 weights (per output channel) and activations (per token, dynamic)",
                fp8=True, needs_bfloat16=True, nexfort_quant_type="fp8_e4m3_e4m3_dynamic",
                torchao="Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())"),
    QuantPreset("fp8_e4m3_e4m3_dynamic_per_tensor",
                "fp8 e4m3 weights and activations, one scale per tensor (dynamic)",
                fp8=True, nexfort_quant_type="fp8_e4m3_e4m3_dynamic_per_tensor",
                torchao="Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())"),
    QuantPreset("int8_dynamic", "int8 weights (per channel) and activations (per token, dynamic)",
                nexfort_quant_type="int8_dynamic", torchao="Int8DynamicActivationInt8WeightConfig()"),
    QuantPreset("fp8_e4m3_e4m3_weightonly",
                "fp8 e4m3 weights (per channel), dequantized for a 16-bit matmul: halves weight memory",
                fp8=True, nexfort_quant_type="fp8_e4m3_e4m3_weightonly",
                default_include=("transformer_blocks.*",), torchao="Float8WeightOnlyConfig()"),
)}
QUANT_TYPES = tuple(QUANT_PRESETS)


def quant_preset(name: str) -> QuantPreset:
    if name not in QUANT_PRESETS:
        raise ConfigError(f"quant={name!r} is not a quantization preset; valid presets: {', '.join(QUANT_TYPES)}")
    return QUANT_PRESETS[name]


def fix_hint(name: str) -> str:
    return "use quant=int8_dynamic or quant=none" if QUANT_PRESETS[name].fp8 else "use quant=none"


def needs_gpu_message(name: str, where: str) -> str:
    return (f"quant={name} needs an NVIDIA GPU with compute capability >= 8.9 (Ada, Hopper or newer) but "
            f"{where}; {fix_hint(name)}")


def preferred_dtype(name: str) -> Optional[str]:
    """The dtype a preset needs when ``dtype=auto`` (None: any)."""
    return "bfloat16" if quant_preset(name).needs_bfloat16 else None


def check_quant_config(qcfg, tokens=(), device: Optional[str] = None, dtype: Optional[str] = None) -> None:
    """Pure checks of the quant keys: preset name, mode token, percentage, device and dtype as configured,
    the JSON file. ``device`` is the configured one: only ``cpu`` with an fp8 preset contradicts itself."""
    tech = quant_preset(qcfg.type)
    if "quant" in tokens and qcfg.type == "none":
        raise ConfigError("mode token 'quant' needs a quantization preset, but quant=none; set "
                          f"quant=<one of {', '.join(t for t in QUANT_TYPES if t != 'none')}> "
                          "or drop 'quant' from mode.spec")
    if not 0 < float(qcfg.top_percentage) <= 100:
        raise ConfigError(f"quant.top_percentage={qcfg.top_percentage} must be in (0, 100]: the share of the "
                          "modules listed in quant.submodules_config_path to quantize, best metric first")
    if qcfg.type == "none":
        return
    if tech.fp8 and device is not None and str(device) == "cpu":
        raise ConfigError(needs_gpu_message(qcfg.type, "this run is on CPU"))
    if tech.needs_bfloat16 and dtype is not None and str(dtype) not in ("auto", "bfloat16"):
        raise ConfigError(f"quant={qcfg.type} (torchao per-row fp8) needs bfloat16 weights but dtype={dtype}; "
                          "set dtype=bfloat16, or use quant=fp8_e4m3_e4m3_dynamic_per_tensor with float16")
    if qcfg.submodules_config_path:
        read_submodules_json(qcfg.submodules_config_path)


def read_submodules_json(path) -> dict[str, float]:
    """Read the seed's JSON form ``{module_name: {"ssim": 0.99, ...}, ...}`` -> {name: ssim}."""
    from ..regular_file import read_regular  # config imports only config/errors/compat at import time

    path = Path(str(path)).expanduser()
    try:  # non-blocking + fstat: a FIFO or device is refused, never waited on
        raw = read_regular(path, MAX_SUBMODULES_BYTES)
    except OSError as exc:
        why = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc.strerror})"
        raise ConfigError(f"quant.submodules_config_path={str(path)!r} {why}; give the JSON file "
                          "mapping module names to metrics (e.g. fp8_e4m3.json) or leave it unset") from None
    if len(raw) > MAX_SUBMODULES_BYTES:
        raise ConfigError(f"quant.submodules_config_path={str(path)!r} is over {MAX_SUBMODULES_BYTES} bytes; "
                          "give the JSON file mapping module names to metrics")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"quant.submodules_config_path={str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a non-empty JSON object mapping module names to metrics, "
                          'e.g. {"transformer_blocks.0.attn.to_q": {"ssim": 0.998}}')
    bad = [k for k, v in data.items() if not isinstance(v, dict) or not isinstance(v.get("ssim"), (int, float))]
    if bad:
        raise ConfigError(f"{path}: entries without a numeric 'ssim' metric: {', '.join(bad[:10])}"
                          f"{' ...' if len(bad) > 10 else ''}; each entry must look like {{\"ssim\": 0.998}}")
    return {k: float(v["ssim"]) for k, v in data.items()}
