"""Load the configured pipeline through the hooked ``from_pretrained`` and run it.

``model`` is an architecture preset (built once with random weights under ``cache_dir/models``), a
local diffusers folder, or a Hub id (diffusers downloads it; needs network access).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from filelock import FileLock

from .cache import cache_paths
from .models import ARCHITECTURES, default_resolution, save_random_pipeline
from .config.resolve import resolve_device, resolve_dtype

log = logging.getLogger("sd3plugin")
DIRECT_LOAD_ENV = "SD3PLUGIN_DIRECT_LOAD"  # =0: load on the CPU, then .to("cuda") (the old way, to compare)


def model_path(cfg) -> str:
    """The folder (or Hub id) to load for ``cfg.model``; random-weight presets are created on first use."""
    if cfg.model not in ARCHITECTURES:
        return cfg.model
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    folder = cache_paths(cfg.cache_dir)["models"] / f"{cfg.model}-{str(dtype).split('.')[-1]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "model_index.json").is_file():
            log.info("sd3plugin: building random-weight %s pipeline in %s", cfg.model, folder)
            # Built on the GPU when there is one: random init of the T5-XXL encoder on CPU takes minutes.
            save_random_pipeline(cfg.model, folder, dtype=dtype, device=device)
    return str(folder)


def load_pipeline(cfg, pipeline_class=None):
    """Load ``cfg.model`` through ``from_pretrained`` (hooked when sd3plugin is enabled), on cfg.device.

    On a GPU the weights go straight to it (``device_map="cuda"``: each component's safetensors are read
    into GPU memory, no CPU copy of the pipeline first); on the CPU as before. ``.to(device)`` then only
    moves what has no weights file (nothing, for diffusers folders); its time is
    ``report(pipe)["startup"]["load"]["to_device_seconds"]``.
    """
    from diffusers import StableDiffusion3Pipeline

    from .optimize import record_startup

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    cls = pipeline_class or StableDiffusion3Pipeline
    kwargs = {dtype_kwarg(): dtype, **direct_load_kwargs(device)}
    pipe = cls.from_pretrained(model_path(cfg), **kwargs)
    started = time.perf_counter()
    pipe = pipe.to(device)
    record_startup(pipe, "load", {"to_device_seconds": round(time.perf_counter() - started, 3),
                                  "device_map": kwargs.get("device_map")})
    return pipe


def direct_load_kwargs(device: str) -> dict:
    """``from_pretrained`` arguments that load the weights straight onto ``device`` (CUDA only)."""
    if device != "cuda" or os.environ.get(DIRECT_LOAD_ENV) == "0":
        return {}
    return {"device_map": "cuda"}


def dtype_kwarg() -> str:
    """``dtype`` on diffusers that deprecate ``torch_dtype`` (0.42+), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def resolution(cfg) -> tuple[int, int]:
    default = default_resolution(cfg.model)
    return int(cfg.height or default), int(cfg.width or default)


def call_kwargs(cfg, height: int | None = None, width: int | None = None, steps: int | None = None,
                output_type: str = "pil", seed: int | None = None) -> dict:
    h, w = resolution(cfg)
    device = resolve_device(cfg.device)
    return dict(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt or None,
                height=height or h, width=width or w, num_inference_steps=steps or cfg.steps,
                guidance_scale=cfg.guidance_scale, num_images_per_prompt=cfg.num_images,
                generator=torch.Generator(device=device).manual_seed(cfg.seed if seed is None else seed),
                output_type=output_type)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def output_dir(cfg) -> Path:
    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except Exception:  # not inside a Hydra app
            path = Path("outputs")
    path.mkdir(parents=True, exist_ok=True)
    return path
