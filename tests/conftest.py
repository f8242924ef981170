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
