"""Quantization (``quant=``): torchao (or nexfort's licensed quantizer) on the selected Linear layers, after
fusing (the fused ``to_qkv`` gets quantized) and before compiling. Not undone: ``undo()`` leaves the weights
quantized and says so in its warning."""
from __future__ import annotations

import logging

from ..compat import diffusers as dcompat
from ..errors import ConfigError
from .base import Handle, Run

log = logging.getLogger("sd3plugin")
NAME = "quantize"


def apply(run: Run) -> Handle | None:
    from ..quant import quantize

    plan = run.plan
    if plan.quant_type != "none" and dcompat.has_adapters(run.transformer):
        raise ConfigError(f"quant={plan.quant_type} cannot quantize a transformer with LoRA adapters loaded "
                          f"({', '.join(dcompat.adapter_names(run.transformer))}); fuse them into the weights "
                          "first (pipe.fuse_lora(); pipe.unload_lora_weights()), or use quant=none")
    backend = run.backend.name if run.backend is not None else "eager"
    run.report["quant"] = quantize(run.transformer, plan.quant, plan.device, backend=backend)
    if not run.report["quant"].get("modules"):
        return None

    def undo():
        log.warning("sd3plugin: undo() keeps the %d quantized layers (quant=%s): quantization is not "
                    "reversible; load the model again for its original weights",
                    len(run.report["quant"]["modules"]), plan.quant_type)

    return Handle(NAME, undo, {})
