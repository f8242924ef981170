"""What a cache was built with: the machine's versions, the config fingerprint, and compatibility checks.

Compiled artefacts are only valid for the same torch, triton, python and GPU architecture; a mismatch
is refused (``--force`` overrides). Other differences (diffusers, cuDNN, GPU model of the same
architecture, sd3plugin) are reported as warnings: they can cost cache misses, never wrong results.
"""
from __future__ import annotations

import hashlib
import json
import platform

from enum import Enum

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config.resolve import resolve_device, resolve_dtype
from ..config.parallel import fingerprint_component
from ..config.schema import compile_keys
from ..config.step_cache import fingerprint_component as step_cache_component

# Environment keys that must match for compiled artefacts to load; the rest only warn.
REQUIRED_MATCH = ("torch", "triton", "python", "machine", "cuda", "gpu_capability")
WARN_MATCH = ("gpu", "cudnn", "diffusers", "sd3plugin")


def environment() -> dict:
    """Versions and hardware of this machine, as recorded in a manifest."""
    import torch

    from .. import __version__

    env = {"sd3plugin": __version__, "python": ".".join(platform.python_version_tuple()[:2]),
           "python_full": platform.python_version(), "machine": platform.machine(),
           "torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
           "cudnn": _cudnn_version(), "diffusers": _diffusers_version(), "gpu": "cpu",
           "gpu_capability": "cpu"}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return env


def _diffusers_version() -> str | None:
    """diffusers' version without importing it where it is not loaded yet (install and info stay small)."""
    import sys

    if "diffusers" in sys.modules:
        return sys.modules["diffusers"].__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return None


def _triton_version() -> str | None:
    import sys

    if "triton" not in sys.modules:  # the installed version, without importing it (install stays small)
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("triton")
        except PackageNotFoundError:
            pass
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _cudnn_version() -> str | None:
    import torch

    try:
        v = torch.backends.cudnn.version()
    except Exception:
        return None
    return str(v) if v else None


# Transformer config keys that shape the compiled graphs (SD3Transformer2DModel arguments).
ARCH_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
             "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
             "out_channels", "pos_embed_max_size", "qk_norm", "dual_attention_layers")


def architecture(model: str) -> dict | None:
    """The transformer architecture of ``model`` (preset, local folder or Hub id in the local HF cache).

    A random-weight preset and the real model of the same architecture get the same fingerprint, so a
    cache warmed with ``model=sd3-medium`` is found when serving the real SD3-medium folder.
    """
    from ..models import ARCHITECTURES, _local_configs

    if model in ARCHITECTURES:
        t = ARCHITECTURES[model].transformer
    else:
        found = _local_configs(model)
        t = found[0] if found else _hub_cached_config(model)
        if t is None:
            return None
    arch = {k: t.get(k) for k in ARCH_KEYS}
    arch["dual_attention_layers"] = list(arch["dual_attention_layers"] or [])
    return arch


def _hub_cached_config(repo_id: str) -> dict | None:
    """``transformer/config.json`` of a Hub model if it is in the local HF cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "transformer/config.json")
        return json.loads(open(path).read()) if isinstance(path, str) else None
    except Exception:
        return None


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return str(value) if isinstance(value, Enum) else value


def compile_config(cfg, arch: dict | None = None) -> dict:
    """The part of a composed config that determines the compiled graphs: every compile key of the schema
    (``config.schema.compile_keys()``), nested as in the config, device and dtype resolved, plus the
    model's architecture (``arch``: that of a loaded transformer instead of ``cfg.model``'s). Run keys
    (prompt, steps, cache_dir...) are left out."""
    out: dict = {}
    for key in compile_keys():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(OmegaConf.select(cfg, key, default=None))
    out.pop("parallel", None)
    parallel = fingerprint_component(cfg) if "parallel" in cfg else None
    if parallel is not None:  # one process: no parallel part, as before the group existed
        out["parallel"] = parallel
    out.pop("step_cache", None)
    step_cache = step_cache_component(cfg)
    if step_cache is not None:  # step_cache=none: no part, as before the group existed
        out["step_cache"] = step_cache
    out["architecture"] = arch if arch is not None else architecture(str(cfg.model))
    device = resolve_device(cfg.device)
    out["device"] = device
    out["dtype"] = str(resolve_dtype(cfg.dtype, device, cfg.quant.type)).split(".")[-1]
    return out


def fingerprint(cfg, arch: dict | None = None) -> str:
    """Short stable hash of ``compile_config(cfg)``: names the cache entry of one config.

    The model's architecture stands for the model when it is known (its name is then left out).
    """
    data = compile_config(cfg, arch)
    if data["architecture"] is not None:
        data.pop("model")
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def compatibility(recorded: dict, here: dict | None = None, device: str | None = None
                  ) -> tuple[list[str], list[str]]:
    """(errors, warnings): how ``recorded`` (a manifest's environment) differs from this machine.

    ``device`` is the device the artefacts were compiled for; CPU artefacts ignore the GPU fields.
    """
    here = environment() if here is None else here
    errors, warnings = [], []
    no_gpu_here = device != "cpu" and here.get("gpu_capability") == "cpu" and recorded.get("gpu_capability") != "cpu"
    if no_gpu_here:  # e.g. a docker build: install now, `verify` on the GPU server
        warnings.append(f"no GPU visible here: cannot check the archive's GPU {recorded.get('gpu')} "
                        f"({recorded.get('gpu_capability')}); run `sd3plugin-cache verify` on the GPU machine")
    for key in REQUIRED_MATCH + WARN_MATCH:
        if (device == "cpu" or no_gpu_here) and key in ("gpu", "gpu_capability", "cudnn", "triton"):
            continue
        a, b = recorded.get(key), here.get(key)
        if a != b:
            line = f"{key} {a} (archive) vs {b} (here)"
            (errors if key in REQUIRED_MATCH else warnings).append(line)
    return errors, warnings
