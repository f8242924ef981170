"""Load the configured pipeline through the hooked ``from_pretrained`` and run it.

``model`` is an architecture preset (built once with random weights under ``cache_dir/models``), a
local diffusers folder, or a Hub id (diffusers downloads it; needs network access): ``model_source``
checks which, ``memory_check`` whether a preset fits.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from filelock import FileLock

from .cache import cache_paths
from .config.resolve import resolve_device, resolve_dtype
from .errors import ConfigError
from .memory_check import check_preset_fits, preset_parameters
from .model_source import check_model_source, is_load_error, load_error
from .models import default_resolution, save_random_pipeline
from .preflight import check_runnable
from .progress import BuildProgress

log = logging.getLogger("sd3plugin")
DIRECT_LOAD_ENV = "SD3PLUGIN_DIRECT_LOAD"  # =0: load on the CPU, then .to("cuda") (the old way, to compare)


def model_path(cfg) -> str:
    """The folder (or Hub id) to load for ``cfg.model``; random-weight presets are created on first use.

    A folder that is missing or not a diffusers folder, and a preset too large for this machine's free
    memory, end here with a ModelError (one line; exit code 2 on the command line), before anything loads."""
    if check_model_source(cfg.model) != "preset":
        return cfg.model
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    base = cache_paths(cfg.cache_dir)["models"] / f"{cfg.model}-{str(dtype).split('.')[-1]}"
    if not (base / "model_index.json").is_file():
        # A first build this machine cannot hold is refused before the models/ folder and its lock file exist
        check_preset_fits(cfg.model, dtype, device, building=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base) + ".lock"):
        key = _saved_by()
        folder = _folder_for(base, key)
        building = not (folder / "model_index.json").is_file()
        check_preset_fits(cfg.model, dtype, device, building=building)
        if building:
            log.info("sd3plugin: building random-weight %s pipeline in %s", cfg.model, folder)
            # Built on the GPU when there is one: random init of the T5-XXL encoder on CPU takes minutes.
            with BuildProgress(cfg.model, preset_parameters(cfg.model)) as progress:
                save_random_pipeline(cfg.model, folder, dtype=dtype, device=device, progress=progress)
            record = folder / "sd3plugin_arch.json"
            meta = json.loads(record.read_text()) if record.is_file() else {}
            record.write_text(json.dumps({**meta, "saved_by": key}, indent=2))
    return str(folder)


def _folder_for(base: Path, key: str) -> Path:
    """Where this environment's copy of a preset lives. A folder saved by another environment's transformers
    may not load here (the nexfort stack's transformers 4.57 cannot read tokenizers of newer ones): each
    environment keeps its own."""
    if not (base / "model_index.json").is_file() or _saved_by(base) == key:
        return base
    return base.with_name(f"{base.name}-{key}")


def _saved_by(folder: Path | None = None) -> str | None:
    """The environment that saved a random-weight folder (``folder``), or this one's: transformers major.minor."""
    if folder is not None:
        try:
            return json.loads((folder / "sd3plugin_arch.json").read_text()).get("saved_by")
        except (OSError, ValueError, AttributeError):
            return None
    import transformers

    return "transformers-" + ".".join(transformers.__version__.split(".")[:2])


def load_pipeline(cfg, pipeline_class=None):
    """Load ``cfg.model`` through ``from_pretrained`` (hooked when sd3plugin is enabled), on cfg.device.

    An explicit backend, attention kernel or quant preset that cannot run here is refused first
    (``preflight.check_runnable``: ConfigError, exit code 2). What diffusers / huggingface_hub raise for a
    model that cannot be found or reached becomes one ModelError naming the problem and the fix.

    On a GPU the weights go straight to it (``device_map="cuda"``: each component's safetensors are read
    into GPU memory, no CPU copy of the pipeline first); on the CPU as before. ``.to(device)`` then only
    moves what has no weights file (nothing, for diffusers folders); its time is
    ``report(pipe)["startup"]["load"]["to_device_seconds"]``.
    """
    from diffusers import StableDiffusion3Pipeline

    from .optimize import record_startup

    check_runnable(cfg)  # an explicit backend / attention / quant that cannot run here: before anything loads
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    cls = pipeline_class or StableDiffusion3Pipeline
    kwargs = {dtype_kwarg(): dtype, **direct_load_kwargs(device)}
    source = model_path(cfg)
    try:
        pipe = cls.from_pretrained(source, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # no such repo, no network, an incomplete folder
        if not is_load_error(source, exc):  # raised while the hook optimized the loaded model
            raise
        raise load_error(source, exc) from exc
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
