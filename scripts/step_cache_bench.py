"""Every step-cache preset against the uncached pipeline on SD3-medium (random weights), one process, the
transformer compiled once with mode=default (regional inductor): median step and end-to-end seconds, speed-ups,
reused steps and block computations, latent PSNR against the uncached latents of the same seed (random
weights: the timings mean something, the PSNR does not judge image quality). Writes $OUT/step_cache.json.
  python scripts/step_cache_bench.py            # sd3-medium, cuda, bf16, 28 steps, 1024x1024 (< 5 min on an H200)
  ARCH=tiny DEVICE=cpu STEPS=10 SIZE=64 REPEAT=1 python scripts/step_cache_bench.py   # quick check on a CPU"""
import json, os, statistics, tempfile, time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

import sd3plugin
from sd3plugin.compat import cache_dit as seam
from omegaconf import OmegaConf

from sd3plugin.config.step_cache import STEP_CACHE_PRESETS, check_blocks, preset_node
from sd3plugin.errors import ConfigError
from sd3plugin.models import save_random_pipeline

ARCH, DEVICE = os.environ.get("ARCH", "sd3-medium"), os.environ.get("DEVICE", "cuda")
STEPS, SIZE = int(os.environ.get("STEPS", 28)), int(os.environ.get("SIZE", 1024))
REPEAT = int(os.environ.get("REPEAT", 3))
MODE = os.environ.get("MODE", "default")
# THRESHOLD=X replaces every preset's residual threshold: on random weights no step is similar enough to be
# reused at the presets' thresholds, so a large X (e.g. 100) measures what each preset's reuse pattern
# (warm-up, Fn/Bn, max_continuous) saves when it does reuse. Written to step_cache_threshold_X.json.
THRESHOLD = os.environ.get("THRESHOLD")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def call(pipe, steps=STEPS, callback=None):
    kw = dict(prompt="a red cube on a wooden table", num_inference_steps=steps, height=SIZE, width=SIZE,
              output_type="latent", generator=torch.Generator(DEVICE).manual_seed(0))
    if callback is not None:
        kw["callback_on_step_end"] = callback
    return pipe(**kw).images


def measure(pipe):
    """Median step seconds and E2E seconds over REPEAT calls (after one warm-up call), and the latents."""
    call(pipe)  # warm-up: compiles at the first shape, cache-dit's first context
    steps, e2e, out = [], [], None
    for _ in range(REPEAT):
        stamps = []

        def cb(p, i, t, kw):
            sync()
            stamps.append(time.perf_counter())
            return kw
        sync()
        t0 = time.perf_counter()
        out = call(pipe, callback=cb)
        sync()
        e2e.append(time.perf_counter() - t0)
        steps += [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps), statistics.median(e2e), out.float().cpu()


def psnr(a, b):  # None: identical
    mse = torch.mean((a - b) ** 2).item()
    rng = (b.max() - b.min()).item() or 1.0
    return None if mse == 0 else 10 * torch.log10(torch.tensor(rng ** 2 / mse)).item()


def main():
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_pipeline(ARCH, Path(tmp) / ARCH, dtype=dtype)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    # Compiled once, without a step cache; each preset is then switched on and off through the seam the
    # step_cache transform uses (cache-dit wraps the compiled forward, as optimize(step_cache=...) does).
    sd3plugin.optimize(pipe, overrides=[f"mode={MODE}", f"device={DEVICE}"])
    step0, e2e0, ref = measure(pipe)
    rows = {"none": {"step_seconds": step0, "e2e_seconds": e2e0, "speedup_step": 1.0, "speedup_e2e": 1.0,
                     "cached_steps": [], "psnr_latent_db": None}}
    print("none", rows["none"], flush=True)
    blocks = len(pipe.transformer.transformer_blocks)
    for name, preset in STEP_CACHE_PRESETS.items():
        if name == "none":
            continue
        knobs = preset.knobs()
        try:
            fn, bn = check_blocks(OmegaConf.create(preset_node(name)), blocks)
        except ConfigError as exc:  # the tiny check: too few blocks for this preset
            rows[name] = {"error": str(exc)}
            continue
        if THRESHOLD is not None:
            knobs = {**knobs, "threshold": float(THRESHOLD)}
        s = seam.StepCacheSettings(**{**knobs, "fn": fn, "bn": bn})
        seam.enable(pipe, s)
        try:
            step, e2e, lat = measure(pipe)
            last = seam.last_call(pipe)
        finally:
            seam.disable(pipe)
        cached = last.get("cached_steps", [])
        rows[name] = {"step_seconds": step, "e2e_seconds": e2e, "speedup_step": step0 / step,
                      "speedup_e2e": e2e0 / e2e, "cached_steps": cached,
                      "reused_block_computations_per_image": len(cached) * (blocks - fn - bn),
                      "block_computations_per_image": last.get("steps", STEPS) * blocks,
                      "psnr_latent_db": psnr(lat, ref), "settings": s.as_dict()}
        print(name, rows[name], flush=True)
    rep = sd3plugin.report(pipe)
    result = {"arch": ARCH, "device": DEVICE, "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
              "dtype": str(dtype), "mode": MODE, "steps": STEPS, "size": SIZE, "repeat": REPEAT,
              "torch": torch.__version__, "cache_dit": seam.version(), "status": rep.get("status"),
              "recompilations": rep.get("recompilations"), "compile_error": rep.get("error"),
              "seconds_total": time.perf_counter() - started,
              "note": "random weights: speed only; the latent PSNR does not judge image quality",
              "threshold_override": None if THRESHOLD is None else float(THRESHOLD), "variants": rows}
    name = "step_cache.json" if THRESHOLD is None else f"step_cache_threshold_{THRESHOLD}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
