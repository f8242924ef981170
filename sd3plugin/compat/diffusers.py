"""diffusers (and peft, through diffusers) internals sd3plugin relies on (written against diffusers
0.30 - 0.42, peft 0.13 - 0.21)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

# Processors SD3AttnProcessor computes exactly; any other (IP-Adapter, PAG, a user's own) is left in place.
JOINT_PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "SD3AttnProcessor")


def attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def attention_modules(transformer) -> list:
    """(name, module) of every diffusers Attention module of ``transformer``."""
    cls = attention_class()
    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, cls)]


def is_joint_processor(processor) -> bool:
    return type(processor).__name__ in JOINT_PROCESSORS


def has_adapters(model) -> bool:
    """True while PEFT adapters (LoRA) are loaded into ``model`` through diffusers."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def adapter_names(model) -> list[str]:
    return sorted(getattr(model, "peft_config", None) or {}) if has_adapters(model) else []


def is_plain_linear(module) -> bool:
    """An ``nn.Linear`` itself (not a PEFT layer wrapping one, not a subclass)."""
    return type(module) is torch.nn.Linear


def hotswap_prepared(model) -> bool:
    return getattr(model, "_prepare_lora_hotswap_kwargs", None) is not None


def clear_hotswap(model) -> None:
    if hasattr(model, "_prepare_lora_hotswap_kwargs"):
        model._prepare_lora_hotswap_kwargs = None


def group_offloaded(model) -> bool:
    """True when diffusers' group offloading (``enable_group_offload``) moves ``model``'s blocks around."""
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:
        return False
    return bool(_is_group_offload_enabled(model))


def offload_hooked(model) -> bool:
    """True when accelerate moves ``model`` between devices around its calls (model CPU offload)."""
    return getattr(model, "_hf_hook", None) is not None


@contextmanager
def timed_component_loads():
    """Seconds each component of a pipeline took to load inside the block: ``{name: seconds}`` (filled as
    diffusers' ``DiffusionPipeline.from_pretrained`` calls ``load_sub_model`` once per component, private to
    ``diffusers.pipelines.pipeline_utils``). Empty where diffusers loads differently."""
    from diffusers.pipelines import pipeline_utils

    times: dict = {}
    original = getattr(pipeline_utils, "load_sub_model", None)
    if original is None:
        yield times
        return

    def load_sub_model(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            name = kwargs.get("name", f"component_{len(times)}")
            times[name] = round(times.get(name, 0.0) + time.perf_counter() - t0, 3)

    pipeline_utils.load_sub_model = load_sub_model
    try:
        yield times
    finally:
        if pipeline_utils.load_sub_model is load_sub_model:
            pipeline_utils.load_sub_model = original
