"""Shared fixtures. The tiny random-weight pipeline is built once per session; compile caches of the
session live in one temporary cache_dir so compiled artefacts are shared between tests."""
from __future__ import annotations

import os

import pytest
import torch

import sd3plugin


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One compile cache for the whole session (set as SD3PLUGIN_CACHE_DIR for subprocesses too)."""
    path = tmp_path_factory.mktemp("sd3cache")
    old = os.environ.get("SD3PLUGIN_CACHE_DIR")
    os.environ["SD3PLUGIN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SD3PLUGIN_CACHE_DIR", None)
    else:
        os.environ["SD3PLUGIN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny SD3 pipeline with random weights, saved as a diffusers folder."""
    from sd3plugin.models import save_random_pipeline

    return save_random_pipeline("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_pipe(tiny_path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_path)


@pytest.fixture(autouse=True)
def _no_hook_leaks():
    """Every test starts and ends with the hook off and global settings restored."""
    sd3plugin.disable()
    yield
    sd3plugin.disable()


def tiny_call(**overrides):
    """Deterministic call arguments for the tiny pipeline (latents out, 4 steps)."""
    kw = dict(prompt="a red cube", num_inference_steps=4, height=64, width=64,
              generator=torch.Generator().manual_seed(0), output_type="latent")
    kw.update(overrides)
    return kw


def make_lora(transformer, path, seed: int, targets, rank: int = 4):
    """Save a random LoRA for ``transformer`` (diffusers' format) into ``path``; the model is left as it was."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                       init_lora_weights=False), adapter_name="tmp")
    sd = get_peft_model_state_dict(transformer, adapter_name="tmp")
    StableDiffusion3Pipeline.save_lora_weights(str(path), transformer_lora_layers=sd)
    transformer.delete_adapters("tmp")
    return str(path)


ALL_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj")


@pytest.fixture(scope="session")
def loras(tiny_path, tmp_path_factory):
    """Three random LoRAs for the tiny pipeline: ``a`` (every projection), ``b`` (some), ``a2`` (``a``'s
    layers, other weights: for hot-swapping)."""
    from diffusers import SD3Transformer2DModel

    t = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(t, root / "a", 1, ALL_TARGETS),
            "b": make_lora(t, root / "b", 2, ("to_q", "to_v", "ff.net.0.proj")),
            "a2": make_lora(t, root / "a2", 3, ALL_TARGETS)}


class SD3Helpers:
    """Random tiny SD3 transformers, their inputs and the relative error (the ``sd3`` fixture)."""

    @staticmethod
    def transformer(variant: str):
        from diffusers import SD3Transformer2DModel

        from sd3plugin.models import architecture

        torch.manual_seed(0)
        return SD3Transformer2DModel(**architecture(variant).transformer).eval()

    @staticmethod
    def inputs(t) -> dict:
        g = torch.Generator().manual_seed(1)
        c = t.config
        return dict(hidden_states=torch.randn(2, c.in_channels, 16, 16, generator=g),
                    encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([500.0, 20.0]))

    @staticmethod
    def rel(a, b) -> float:
        return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def sd3():
    return SD3Helpers
