"""Quantization presets (filled in by the quantization issue): validation and application.

One config object per technique, one verb that applies it: ``quantize(transformer, quant_cfg, device)``.
"""
from __future__ import annotations

from .errors import ConfigError

QUANT_TYPES = ("none",)


def validate_quant(qcfg, tokens=()) -> None:
    if qcfg.type not in QUANT_TYPES:
        raise ConfigError(f"quant={qcfg.type!r} is not a quantization preset; valid presets: "
                          f"{', '.join(QUANT_TYPES)}")
    if "quant" in tokens and qcfg.type == "none":
        raise ConfigError("mode token 'quant' needs a quantization preset, but quant=none; set "
                          f"quant=<one of {', '.join(t for t in QUANT_TYPES if t != 'none') or 'none yet'}> "
                          "or drop 'quant' from mode.spec")


def quantize(transformer, qcfg, device: str) -> dict:
    """Quantize ``transformer`` in place; return what was done (for report())."""
    return {"type": qcfg.type, "modules": []}
