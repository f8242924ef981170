"""One line about every schema key, for ``--help`` (docs/config.md has the long form).

``tests/test_cli_help.py`` checks that this table names exactly the schema's keys, so a new key without a
line here fails the tests.
"""
from __future__ import annotations

KEY_DOCS: dict[str, str] = {
    "model": "architecture preset with random weights, built locally (tiny, tiny-sd3.5, sd3-medium, sd3.5-medium, "
             "sd3.5-large), a local diffusers folder, or a Hub id",
    "backend": "auto (nexfort where it runs, else inductor) | inductor | nexfort | eager",
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
    "backend_options": "extra options for the backend as they are (+backend_options.NAME=VALUE)",
    "fuse_qkv": "fuse the attention's Q/K/V projections into one matmul",
    "fuse_gelu": "on CUDA: the feed-forward's bias and GELU in the matmul's epilogue",
    "attention": "attention kernel: auto | sdpa | fa4 | int8 | int8_fp8",
    "joint_attention": "with attention=fa4: SD3's joint attention as one op",
    "compile_vae": "compile the VAE decoder too",
    "compile_text_encoders": "compile the text encoders too (T5-XXL, CLIP)",
    "lora_hotswap_rank": "prepare for hot-swapping LoRAs up to this rank without recompiling",
    "device": "auto (CUDA if visible) | cuda | cpu",
    "dtype": "auto (float16 on CUDA, float32 on CPU, bfloat16 where the quant preset needs it) | float16 | "
             "bfloat16 | float32",
    "cache_dir": "compile caches and random-weight models ($SD3PLUGIN_CACHE_DIR)",
    "on_error": "fallback (a failed compile keeps eager and says why) | raise",
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
