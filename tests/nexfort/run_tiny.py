"""One process of the nexfort tests: the tiny pipeline eagerly, then through the hook with backend=nexfort.

    python -m tests.nexfort.run_tiny MODEL_DIR CACHE_DIR OUT_JSON [extra overrides...]

(mode=max-autotune unless an override sets mode)

Writes timings, the largest difference to eager, the report and the licensed nexfort modules that got
imported, then waits 2 s: without a licence those modules end the process (exit code 255) within about
a second, so the caller's check of exit code 0 means none of them ran.
"""
import json
import os
import sys
import time

import torch

LICENSED = ("nexfort.nn.modules", "nexfort.nn.attention_processor", "nexfort.compilers.register_diffusers")


def loaded_licensed() -> list[str]:
    return [m for m in LICENSED if m in sys.modules]


def call_kwargs():
    return dict(prompt="a red cube", num_inference_steps=4, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="latent")


def main(model: str, cache_dir: str, out_path: str, *overrides: str) -> None:
    import onediff  # noqa: F401  merely importing onediff/onediffx must not pull the licensed modules in
    import onediffx  # noqa: F401
    from diffusers import StableDiffusion3Pipeline

    import sd3plugin

    after_imports = loaded_licensed()
    eager = StableDiffusion3Pipeline.from_pretrained(model)(**call_kwargs()).images
    mode = [] if any(o.startswith("mode=") for o in overrides) else ["mode=max-autotune"]
    sd3plugin.enable(overrides=["backend=nexfort", *mode, f"cache_dir={cache_dir}", "on_error=raise", *overrides])
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    started = time.perf_counter()
    first = pipe(**call_kwargs()).images
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    second = pipe(**call_kwargs()).images
    second_s = time.perf_counter() - started
    rep = sd3plugin.report(pipe)
    result = {
        "first_call_s": first_s, "second_call_s": second_s,
        "max_abs_diff": (first - eager).abs().max().item(), "eager_max_abs": eager.abs().max().item(),
        "repeat_max_abs_diff": (second - first).abs().max().item(),
        "report": {k: rep.get(k) for k in ("status", "backend", "backend_reason", "compiled_modules", "error",
                                           "nexfort_options", "fused_qkv", "nexfort_graph_cache_dir")},
        "licensed_after_imports": after_imports, "licensed_at_end": loaded_licensed(),
        "env_graph_cache": os.environ.get("NEXFORT_GRAPH_CACHE"),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    time.sleep(2.0)


if __name__ == "__main__":
    main(*sys.argv[1:])
