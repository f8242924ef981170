"""One line about every schema key, for ``--help`` (docs/config.md has the long form).

``tests/test_cli_help.py`` checks that this table names exactly the schema's keys, so a new key without a
line here fails the tests. ``{values}`` in a line stands for the key's values, read from its choice table
when the help is printed (``key_doc``), so a value added to a table is listed without editing this file.
"""
from __future__ import annotations

from . import choices

KEY_DOCS: dict[str, str] = {
    "model": "architecture preset with random weights, built locally ({values}), a local diffusers folder, or a "
             "Hub id",
    "backend": "{values}",
    "mode.name": "name of the mode preset (set by mode=...)",
    "mode.spec": "the compile mode's ':'-separated tokens (docs/modes.md)",
    "mode.description": "one line about the mode preset",
    "memory_format.name": "memory format of the VAE's convolutions (set by memory_format=...)",
    "dynamic.enabled": "one compiled graph for all resolutions (set by dynamic=true)",
    "dynamic.recompile_limit": "Dynamo's per-code-object recompile limit",
    "quant.type": "quantization preset (set by quant=...; docs/quantization.md)",
    "quant.submodules_config_path": "JSON of per-module metrics; its top modules are quantized",
    "quant.top_percentage": "share of that JSON's modules to quantize, best first, in (0, 100]",
    "quant.include": "fnmatch patterns of the Linear layers to quantize",
    "quant.exclude": "fnmatch patterns of the layers to keep in high precision",
    "parallel.name": "name of the parallel preset (set by parallel=...; docs/parallel.md)",
    "parallel.cfg": "CFG parallel: the unconditional half of classifier-free guidance on its own GPU",
    "parallel.ulysses": "Ulysses sequence-parallel degree (GPUs sharing the attention heads)",
    "parallel.ring": "ring sequence-parallel degree (GPUs passing K/V around a ring)",
    "parallel.pipefusion": "PipeFusion degree (pipeline stages of transformer blocks)",
    "parallel.patches": "PipeFusion's patch count (null: one per stage)",
    "parallel.launch": "auto (start the ranks with torch.distributed.run) | print (print that command)",
    "step_cache.name": "step-cache preset (set by step_cache=...; docs/step-cache.md); none: every step exact",
    "step_cache.fn": "blocks always computed first; their residual decides whether to reuse the rest (Fn)",
    "step_cache.bn": "blocks always computed last (Bn)",
    "step_cache.threshold": "relative residual change under which the middle blocks are reused (0: never)",
    "step_cache.warmup": "steps always computed at the start",
    "step_cache.max_cached": "most steps reused per image (-1: no limit)",
    "step_cache.max_continuous": "most steps reused in a row (-1: no limit)",
    "step_cache.taylorseer_order": "TaylorSeer forecast of the reused residual, this order (0: off; needs bn >= 1)",
    "backend_options": "extra options for the backend as they are (+backend_options.NAME=VALUE)",
    "fuse_qkv": "fuse the attention's Q/K/V projections into one matmul",
    "fuse_gelu": "on CUDA: the feed-forward's bias and GELU in the matmul's epilogue",
    "attention": "attention kernel: {values}",
    "joint_attention": "with attention=fa4: SD3's joint attention as one op",
    "compile_vae": "compile the VAE decoder too",
    "compile_text_encoders": "compile the text encoders too (T5-XXL, CLIP)",
    "fp8_fused_activation": "with quant=fp8_e4m3_e4m3_dynamic: norm + modulation and GELU write the fp8 "
                            "activations and scales in one kernel (no separate quantization passes)",
    "lora_hotswap_rank": "prepare for hot-swapping LoRAs up to this rank without recompiling",
    "device": "{values}",
    "dtype": "{values}",
    "cache_dir": "compile caches and random-weight models ($SD3PLUGIN_CACHE_DIR)",
    "on_error": "{values}",
    "fa4_prewarm": "compile FlashAttention-4's kernel in a child process while compiling",
    "keep_coordesc": "reuse cached coordinate-descent tuning at a warm start",
    "precompiled": "run the cache entry's precompiled transformer blocks where they match this machine",
    "prompt": "the prompt",
    "negative_prompt": "the negative prompt",
    "height": "image height in pixels (null: the model's default)",
    "width": "image width in pixels (null: the model's default)",
    "steps": "denoising steps",
    "guidance_scale": "classifier-free guidance scale",
    "seed": "random seed",
    "num_images": "images per prompt",
    "output_dir": "where images and report.md / report.json go (null: outputs/DATE/TIME)",
    "image_path": "the file the image is written to (more images: numbered beside it)",
}


# What a value means, where a word helps (the values themselves come from the tables below).
VALUE_NOTES: dict[str, dict[str, str]] = {
    "backend": {"auto": "nexfort where it runs, else inductor"},
    "attention": {"auto": "the fastest kernel that runs here, else sdpa"},
    "device": {"auto": "CUDA if visible"},
    "dtype": {"auto": "float16 on CUDA, float32 on CPU, bfloat16 where the quant preset needs it"},
    "on_error": {"fallback": "a failed compile keeps eager and says why"},
}


def choice_table(key: str) -> tuple[str, ...] | None:
    """The values ``key`` takes, from the table the config validates it with (None: not a choice key)."""
    if key == "backend":
        from . import schema

        return tuple(schema.BACKENDS)  # plugins may add backends: read at call time
    if key == "model":
        from ..models import ARCHITECTURES

        return tuple(ARCHITECTURES)
    return {"attention": choices.ATTENTION_KERNELS, "device": choices.DEVICES, "dtype": choices.DTYPES,
            "on_error": choices.ON_ERROR}.get(key)


def key_doc(key: str) -> str:
    """``KEY_DOCS[key]`` with ``{values}`` filled in from the key's choice table."""
    text = KEY_DOCS.get(key, "")
    table = choice_table(key)
    if table is None or "{values}" not in text:
        return text
    notes = VALUE_NOTES.get(key, {})
    sep = ", " if key == "model" else " | "
    return text.replace("{values}", sep.join(f"{v} ({notes[v]})" if v in notes else v for v in table))
