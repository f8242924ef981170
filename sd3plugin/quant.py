"""Quantization presets: validation, layer selection and application (docs/quantization.md).

One config object per technique (``PRESETS``), one verb that applies it:
``quantize(transformer, qcfg, device) -> report``. Quantization uses torchao (open source); with
``backend=nexfort`` and ``SILICON_ONEDIFF_LICENSE_KEY`` set, nexfort's own (licensed) quantizer is used.
Quantize before compiling: the compiled graphs then contain the quantized matmuls.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from .config.hardware import FP8_MIN_CAPABILITY, check_quant_device as check_device  # noqa: F401
from .config.quant_presets import QUANT_PRESETS, QUANT_TYPES, QuantPreset, check_quant_config, quant_preset
from .config.quant_presets import preferred_dtype  # noqa: F401
from .config.quant_presets import read_submodules_json as load_submodules_json
from .errors import ConfigError

log = logging.getLogger("sd3plugin")

LICENSE_ENV = "SILICON_ONEDIFF_LICENSE_KEY"


@dataclass(frozen=True)
class QuantTechnique(QuantPreset):
    """A preset of ``config.quant_presets.QUANT_PRESETS`` with the torchao config it builds."""

    torchao_config: Optional[Callable[[], object]] = None  # None for ``none``


def _fp8_dynamic(granularity: str):
    def make():
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        gran = PerRow() if granularity == "row" else PerTensor()
        return Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
    return make


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _fp8_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig(set_inductor_config=False)


_TORCHAO_CONFIGS = {"none": None, "fp8_e4m3_e4m3_dynamic": _fp8_dynamic("row"),
                    "fp8_e4m3_e4m3_dynamic_per_tensor": _fp8_dynamic("tensor"), "int8_dynamic": _int8_dynamic,
                    "fp8_e4m3_e4m3_weightonly": _fp8_weight_only}
if set(_TORCHAO_CONFIGS) != set(QUANT_PRESETS):
    raise ImportError(f"quant presets without a torchao config: {set(QUANT_PRESETS) ^ set(_TORCHAO_CONFIGS)}")
PRESETS: dict[str, QuantTechnique] = {
    name: QuantTechnique(**{f.name: getattr(p, f.name) for f in fields(p)}, torchao_config=_TORCHAO_CONFIGS[name])
    for name, p in QUANT_PRESETS.items()}

# Default layer selection: the image-stream matmuls of the repeated blocks, which carry almost all
# linear FLOPs (8192 of 8858 rows per step at 1024x1024) and where fp8 GEMMs run 1.5-1.7x faster on an
# H100. Left out: the time/text embedders, context_embedder, pos_embed, the AdaLN modulation linears
# (norm1*.linear, norm_out.linear: 2 rows per call, no speed to gain, every activation depends on them),
# proj_out, and the text stream (add_*_proj, to_add_out, ff_context: 666 rows, 1.25x at best).
# The weight-only preset saves memory rather than time, so by default it takes every Linear of the blocks.
DEFAULT_INCLUDE = (
    "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_qkv", "transformer_blocks.*.attn.to_out.0",
    "transformer_blocks.*.attn2.to_q", "transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v",
    "transformer_blocks.*.attn2.to_qkv", "transformer_blocks.*.attn2.to_out.0",
    "transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2",
)
_FUSED = {"to_q": "to_qkv", "to_k": "to_qkv", "to_v": "to_qkv",
          "add_q_proj": "to_added_qkv", "add_k_proj": "to_added_qkv", "add_v_proj": "to_added_qkv"}


def preset(name: str) -> QuantTechnique:
    quant_preset(name)  # ConfigError listing the valid presets
    return PRESETS[name]


def validate_quant(qcfg, tokens=(), device: Optional[str] = None, dtype: Optional[str] = None) -> None:
    """Config-time checks, pure (no hardware): preset name, mode token, device/dtype as configured,
    percentage, JSON file. The GPU is checked by ``check_device`` when the plan is applied."""
    check_quant_config(qcfg, tokens, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------------

def top_modules(metrics: dict[str, float], top_percentage: float) -> list[str]:
    """The best ``top_percentage`` percent of modules by SSIM (highest first), as onediffx does."""
    ranked = sorted(metrics, key=lambda k: metrics[k], reverse=True)
    return ranked[:int(len(ranked) * float(top_percentage) / 100)]


def _strip_prefix(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def linear_modules(transformer) -> dict[str, torch.nn.Module]:
    """Every nn.Linear that runs in the forward pass (the originals of fused projections are dropped)."""
    mods = dict(transformer.named_modules())
    out = {}
    for name, mod in mods.items():
        if not isinstance(mod, torch.nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        fused = _FUSED.get(leaf)
        if fused and _uses_fused(mods.get(parent)) and f"{parent}.{fused}" in mods:
            continue
        out[name] = mod
    return out


def _uses_fused(attn) -> bool:
    """True when the attention module runs its fused projections (the originals stay as modules)."""
    from .kernels.attention import SD3AttnProcessor, uses_fused

    proc = getattr(attn, "processor", None)
    if isinstance(proc, SD3AttnProcessor):  # sd3plugin's processor runs to_qkv while fused
        return uses_fused(attn)
    return "Fused" in type(proc).__name__


def _map_fused(name: str, available: dict) -> str:
    parent, _, leaf = name.rpartition(".")
    fused = _FUSED.get(leaf)
    if name not in available and fused and f"{parent}.{fused}" in available:
        return f"{parent}.{fused}"
    return name


def select_modules(transformer, qcfg) -> tuple[list[str], dict[str, str], str]:
    """Pick the Linear layers to quantize. Returns (selected, skipped {name: reason}, how)."""
    linears = linear_modules(transformer)
    all_names = {n for n, _ in transformer.named_modules()}
    include, exclude = list(qcfg.include or ()), list(qcfg.exclude or ())
    if qcfg.submodules_config_path:
        metrics = load_submodules_json(qcfg.submodules_config_path)
        names = {_strip_prefix(k): v for k, v in metrics.items()}
        missing = sorted(k for k in names if k not in all_names)
        if missing:
            raise ConfigError(f"{qcfg.submodules_config_path} names {len(missing)} module(s) this transformer does "
                              f"not have: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; the "
                              "JSON must come from the same architecture (names relative to the transformer)")
        chosen = {_map_fused(n, linears) for n in top_modules(names, qcfg.top_percentage)}
        base = [n for n in linears if n in chosen]
        how = f"json top {qcfg.top_percentage}%"
        if include:
            base = [n for n in base if _matches(n, include)]
            how += " and include"
    elif include:
        base = [n for n in linears if _matches(n, include)]
        how = "include"
    else:
        base = [n for n in linears if _matches(n, PRESETS[qcfg.type].default_include or DEFAULT_INCLUDE)]
        how = "default"
    for pats, key in ((include, "quant.include"), (exclude, "quant.exclude")):
        unused = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
        if unused:
            raise ConfigError(f"{key} pattern(s) {', '.join(map(repr, unused))} match no module of the transformer; "
                              "patterns are fnmatch globs on names such as 'transformer_blocks.*.attn.to_q'")
    selected = [n for n in base if not _matches(n, exclude)]
    skipped = {}
    for n in linears:
        if n in selected:
            continue
        skipped[n] = "quant.exclude" if n in base else ("not in JSON top list" if how.startswith("json")
                                                        else "not matched by quant.include" if include
                                                        else default_exclusion_reason(n))
    return selected, skipped, how


def default_exclusion_reason(name: str) -> str:
    """Why the default selection leaves ``name`` in high precision (for the report)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith(("time_text_embed.", "context_embedder", "pos_embed")):
        return "default: embedder (runs once per step on few rows)"
    if name == "proj_out":
        return "default: final projection (writes the predicted noise)"
    if ".norm" in f".{name}" and leaf == "linear":
        return "default: AdaLN modulation (2 rows, scales every activation)"
    if leaf in ("add_q_proj", "add_k_proj", "add_v_proj", "to_added_qkv", "to_add_out") or ".ff_context." in name:
        return "default: text stream (333 tokens, little to gain)"
    return "default: not an image-stream block matmul"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------------------------------

def _is_quantized(weight) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.dtype in (
        torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def _is_quantized_module(mod) -> bool:
    return type(mod) is not torch.nn.Linear or _is_quantized(mod.weight)


def _torchao_version() -> str:
    try:
        import torchao
    except ImportError:
        raise ConfigError("quantization needs torchao; install it with pip install torchao (or pip install "
                          "'.[quant]' from a checkout of sd3plugin), or use quant=none") from None
    return torchao.__version__


def quantize(transformer, qcfg, device: str, backend: str = "inductor") -> dict:
    """Quantize the selected Linear layers of ``transformer`` in place; return what was done."""
    tech = preset(qcfg.type)
    if tech.torchao_config is None:
        return {"type": "none", "library": None, "modules": [], "skipped": {}}
    check_device(qcfg.type, device)
    selected, skipped, how = select_modules(transformer, qcfg)
    linears = linear_modules(transformer)
    if tech.needs_bfloat16:
        bad = sorted({str(linears[n].weight.dtype).split(".")[-1] for n in selected
                      if linears[n].weight.dtype != torch.bfloat16})
        if bad:
            raise ConfigError(f"quant={qcfg.type} (torchao per-row fp8) needs bfloat16 weights but the "
                              f"transformer is {', '.join(bad)}; load it with dtype=bfloat16, or use "
                              "quant=fp8_e4m3_e4m3_dynamic_per_tensor")
    already = [n for n in selected if _is_quantized(linears[n].weight)]
    if already:
        raise ConfigError(f"{len(already)} module(s) are quantized already ({', '.join(already[:5])}); "
                          "quantize a freshly loaded transformer")
    if backend == "nexfort" and os.environ.get(LICENSE_ENV):
        library = _quantize_nexfort(transformer, tech, selected)
    else:
        if backend == "nexfort":
            log.info("sd3plugin: nexfort's quantizer is a licensed feature (%s is not set); quantizing with "
                     "torchao", LICENSE_ENV)
        library = f"torchao {_torchao_version()}"
        from torchao.quantization import quantize_

        # The separate projections of a fused one are views of its weight: quantizing only the fused
        # module would keep the 16-bit storage alive through them, so they are quantized too (not run).
        wanted = set(selected) | set(_fused_originals(transformer, selected))
        quantize_(transformer, tech.torchao_config(), filter_fn=lambda mod, fqn: fqn in wanted)
    after = dict(transformer.named_modules())
    done = [n for n in selected if _is_quantized_module(after[n])]
    for n in selected:
        if n not in done:
            shape = tuple(linears[n].weight.shape)
            skipped[n] = f"kept by {library.split()[0]}: weight shape {shape} not supported"
    log.info("sd3plugin: quant=%s with %s: %d of %d linear layers quantized (%s selection)",
             qcfg.type, library, len(done), len(linears), how)
    return {"type": qcfg.type, "description": tech.description, "library": library, "selection": how, "modules": done,
            "skipped": dict(sorted(skipped.items())), "num_linear": len(linears)}


def _fused_originals(transformer, selected: list[str]) -> list[str]:
    """The unfused projections standing behind the selected fused ones (``to_q`` for ``to_qkv``...)."""
    mods = dict(transformer.named_modules())
    out = []
    for leaf, fused in _FUSED.items():
        for name in selected:
            parent, _, last = name.rpartition(".")
            if last == fused and f"{parent}.{leaf}" in mods:
                out.append(f"{parent}.{leaf}")
    return out


def _quantize_nexfort(transformer, tech: QuantTechnique, selected: list[str]) -> str:
    """nexfort's licensed quantizer (onediffx's quantize_pipe does the same per module)."""
    try:
        from nexfort.ao import quantize as nexfort_quantize
    except ImportError as exc:
        raise ConfigError(f"backend=nexfort with {LICENSE_ENV} set, but nexfort.ao cannot be imported ({exc}); "
                          f"unset {LICENSE_ENV} to quantize with torchao") from None
    nexfort_quantize(transformer, quant_type=tech.nexfort_quant_type, filter_fn="is_allowed_fqn",
                     filter_fn_kwargs={"allowed_fqns": list(selected)})
    import nexfort

    return f"nexfort {getattr(nexfort, '__version__', '?')}"
