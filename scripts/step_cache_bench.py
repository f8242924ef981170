"""Each cache-dit step-cache preset against the uncached pipeline, same process, same seed: seconds per
image, speed-up, reused steps and latent PSNR. Random weights: the timings mean something, the PSNR does not
judge image quality. Writes $OUT/step_cache.json.
  python scripts/step_cache_bench.py            # sd3-medium, cuda, bf16, 28 steps, 1024x1024
  ARCH=tiny DEVICE=cpu STEPS=8 SIZE=64 python scripts/step_cache_bench.py   # quick check on a CPU"""
import json, os, tempfile, time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from sd3plugin.compat import cache_dit as seam
from sd3plugin.models import save_random_pipeline

ARCH, DEVICE = os.environ.get("ARCH", "sd3-medium"), os.environ.get("DEVICE", "cuda")
STEPS, SIZE = int(os.environ.get("STEPS", 28)), int(os.environ.get("SIZE", 1024))
PRESETS = {
    "fbcache": seam.StepCacheSettings(fn=1, bn=0, threshold=0.08, warmup=4),
    "dbcache": seam.StepCacheSettings(fn=8, bn=0, threshold=0.08, warmup=8),
    "dbcache_taylorseer": seam.StepCacheSettings(fn=1, bn=1, threshold=0.12, warmup=4, taylorseer_order=1),
}


def run(pipe):
    kw = dict(prompt="a red cube", num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
              generator=torch.Generator(DEVICE).manual_seed(0))
    pipe(**{**kw, "num_inference_steps": 2})  # warm-up
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = pipe(**kw).images
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out.float().cpu(), time.perf_counter() - t


def psnr(a, b):  # None: identical
    mse = torch.mean((a - b) ** 2).item()
    rng = (b.max() - b.min()).item() or 1.0
    return None if mse == 0 else 10 * torch.log10(torch.tensor(rng ** 2 / mse)).item()


def main():
    out = Path(os.environ.get("OUT", "."))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_pipeline(ARCH, Path(tmp) / ARCH)
        pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        ref, t0 = run(pipe)
        rows = {"none": {"seconds": t0, "speedup": 1.0, "cached_steps": 0, "psnr_latent": None}}
        n_blocks = len(pipe.transformer.transformer_blocks)
        for name, s in PRESETS.items():
            s = seam.StepCacheSettings(**{**s.__dict__, "fn": min(s.fn, n_blocks - 1)})  # tiny: 2 blocks
            seam.enable(pipe, s)
            img, t = run(pipe)
            rows[name] = {"seconds": t, "speedup": t0 / t, "cached_steps": len(seam.cached_steps(pipe)),
                          "psnr_latent": psnr(img, ref), "settings": s.__dict__}
            seam.disable(pipe)
    result = {"arch": ARCH, "device": DEVICE, "steps": STEPS, "size": SIZE, "torch": torch.__version__,
              "variants": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cache.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
