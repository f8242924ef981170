"""xDiT (xfuser 0.7.0) as sd3plugin uses it: one image of an SD3 pipeline on several GPUs.

Every xfuser call of the plugin is here. Written against xfuser 0.7.0 (``pip install "sd3plugin[parallel]"``):
``xFuserArgs(...).create_config()`` (which also starts the process group from torch.distributed.run's
environment), ``xFuserStableDiffusion3Pipeline(pipeline, engine_config)`` (wraps the transformer's attention
modules, patch embedding and scheduler for the configured parallelism), ``is_dp_last_group()`` (the rank
that holds the decoded image) and one private table, xfuser's map from diffusers' attention processor classes
to its own (``xFuserAttentionProcessorRegister._XFUSER_ATTENTION_PROCESSOR_MAPPING``): sd3plugin's SD3
processor is entered there so that xDiT swaps it for its joint processor as it swaps diffusers' own.

xfuser 0.7.0 does not import on a machine without an accelerator (``xfuser.envs`` raises
NotImplementedError while importing its config), so nothing here runs on CPU; ``unavailable()`` says why.
"""
from __future__ import annotations

TESTED_VERSION = "0.7.0"


def unavailable() -> str | None:
    """None when xfuser imports here; else one line naming the problem (for the user's error)."""
    try:
        import xfuser  # noqa: F401
        from xfuser import xFuserArgs, xFuserStableDiffusion3Pipeline  # noqa: F401
    except ImportError as exc:
        return f"xfuser is not installed ({exc.name or exc})"
    except NotImplementedError as exc:  # xfuser.envs on a machine without GPUs
        return f"xfuser does not import here: {exc}"
    return None


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("xfuser")
    except Exception:  # not installed
        return None


def engine_config(args: dict):
    """``(engine_config, input_config)`` from xFuserArgs keyword arguments; starts the process group."""
    from xfuser import xFuserArgs

    return xFuserArgs(**args).create_config()


def accept_processor(processor_cls) -> None:
    """Let xDiT replace ``processor_cls`` (sd3plugin's SD3 attention processor) with its joint processor, as
    it replaces diffusers' JointAttnProcessor2_0 (it raises for a processor class it does not know)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from xfuser.model_executor.layers.attention_processor import xFuserAttentionProcessorRegister

    table = xFuserAttentionProcessorRegister._XFUSER_ATTENTION_PROCESSOR_MAPPING
    table.setdefault(processor_cls, table[JointAttnProcessor2_0])


def wrap_pipeline(pipe, engine_cfg):
    """xDiT's SD3 pipeline around a loaded (and optimized) diffusers StableDiffusion3Pipeline."""
    from xfuser import xFuserStableDiffusion3Pipeline

    return xFuserStableDiffusion3Pipeline(pipe, engine_cfg)


def holds_output(xpipe) -> bool:
    """Whether this rank receives the decoded images (xDiT returns None on the others)."""
    return bool(xpipe.is_dp_last_group())


def shutdown() -> None:
    """Leave xDiT's process groups (the end of a rank)."""
    from xfuser.core.distributed import get_runtime_state

    get_runtime_state().destroy_distributed_env()
