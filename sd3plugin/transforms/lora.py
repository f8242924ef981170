"""LoRA on an optimized transformer: hot-swapping prepared (``lora_hotswap_rank``), and loads that cannot be
exact refused before anything changes.

- ``lora_hotswap_rank=N``: diffusers' ``enable_lora_hotswap(target_rank=N)`` before the first adapter, so
  the compiled graphs built for the first LoRA serve every later one loaded with
  ``load_lora_weights(..., hotswap=True)`` (ranks up to N): no recompilation.
- A LoRA whose target layers are quantized is refused with an error naming ``quant=`` (PEFT would wrap a
  quantized layer, or merge into it, with results that differ from diffusers').
Everything else about LoRA works through the separate projections (``fuse_qkv.sync``) and the GELU epilogue's
check at each call.
"""
from __future__ import annotations

import functools

from ..backends import cudagraph
from ..compat import diffusers as dcompat
from ..compat import torch as tcompat
from ..errors import ConfigError
from .base import Handle, Run

NAME = "lora"


def _lora_targets(state_dict) -> set[str]:
    """Module names a LoRA state dict writes to (``transformer.`` prefixes and PEFT suffixes removed)."""
    names = set()
    for key in state_dict:
        for marker in (".lora_A", ".lora_B", ".lora.down", ".lora.up", ".lora_down", ".lora_up"):
            if marker in key:
                name = key.split(marker)[0]
                names.add(name[len("transformer."):] if name.startswith("transformer.") else name)
                break
    return names


def _guard_loads(transformer, quantized: list[str], quant: str):
    """Wrap the transformer's ``load_lora_adapter`` (what ``pipe.load_lora_weights`` calls): refuse LoRAs on
    quantized layers; hide the whole-step CUDA-graph runner while PEFT prepares hot-swapping (PEFT refuses
    a module that has a compiled call of its own) and drop its graphs after a load."""
    original = transformer.load_lora_adapter  # bound method of diffusers' PeftAdapterMixin

    @functools.wraps(original)
    def load_lora_adapter(pretrained_model_name_or_path_or_dict, *args, **kwargs):
        sd = pretrained_model_name_or_path_or_dict
        targets = _lora_targets(sd) if isinstance(sd, dict) else None
        hit = sorted(set(quantized) & targets) if targets is not None and quantized else quantized
        if hit:
            raise ConfigError(f"this LoRA targets {len(hit)} layer(s) that quant={quant} quantized "
                              f"({', '.join(hit[:3])}{' ...' if len(hit) > 3 else ''}); load the LoRA before "
                              "optimizing and fuse it (pipe.fuse_lora(); pipe.unload_lora_weights()), or exclude "
                              "those layers with quant.exclude, or use quant=none")
        runner = cudagraph.runner_of(transformer)
        if runner is not None:
            tcompat.clear_compiled_call(transformer)
        try:
            return original(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        finally:
            if runner is not None:
                runner.drop()
                tcompat.set_compiled_call(transformer, runner)

    transformer.load_lora_adapter = load_lora_adapter
    return lambda: transformer.__dict__.pop("load_lora_adapter", None)


def apply(run: Run) -> Handle | None:
    t, plan = run.transformer, run.plan
    undo = []
    report = {"hotswap_rank": None}
    if plan.lora_hotswap_rank:
        if dcompat.has_adapters(t):
            raise ConfigError(f"lora_hotswap_rank={plan.lora_hotswap_rank} must be set before the first LoRA is "
                              f"loaded, and {', '.join(dcompat.adapter_names(t))} is loaded already; optimize "
                              "first, then load LoRAs (or leave lora_hotswap_rank unset)")
        t.enable_lora_hotswap(target_rank=int(plan.lora_hotswap_rank))
        report["hotswap_rank"] = int(plan.lora_hotswap_rank)
        undo.append(lambda: dcompat.clear_hotswap(t))
    quantized = list(run.report.get("quant", {}).get("modules") or [])
    if hasattr(t, "load_lora_adapter"):
        undo.append(_guard_loads(t, quantized, plan.quant_type))
    run.report["lora"] = report
    if not undo:
        return None
    return Handle(NAME, lambda: [u() for u in reversed(undo)], {})
