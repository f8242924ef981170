"""The baseline of ``sd3plugin-cache verify --baseline``: plain diffusers, eager, in a fresh process.

Run as a script (``python -X importtime .../baseline_child.py PAYLOAD``), never imported: the process
imports torch and diffusers only, no sd3plugin, and loads the pipeline the way a diffusers user does
(``from_pretrained`` with the dtype, then ``.to(device)``). It prints one line ``MARK + JSON`` with the same
phase names as the warm start's breakdown (``sd3plugin.apps.baseline`` compares them).

PAYLOAD (JSON): folder, dtype (a torch dtype name), dtype_kwarg, device, call (the pipeline's arguments:
prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt), seed,
spawned_at (the parent's ``time.time()`` just before starting this process), steady (also time a second
image).
"""
import sys
import time

_T_START = time.perf_counter()
_WALL_START = time.time()
if sys.path and sys.path[0].endswith("apps"):
    sys.path.pop(0)  # this script's folder must not shadow top-level modules (run, metrics, ...)

import json  # noqa: E402

MARK = "sd3plugin_baseline="


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(payload: dict) -> dict:
    import torch
    import diffusers  # noqa: F401
    from diffusers import StableDiffusion3Pipeline

    imported = time.perf_counter()
    device = payload["device"]
    dtype = getattr(torch, payload["dtype"])
    t0 = time.perf_counter()
    pipe = StableDiffusion3Pipeline.from_pretrained(payload["folder"], **{payload["dtype_kwarg"]: dtype})
    t1 = time.perf_counter()
    pipe = pipe.to(device)
    _sync(device)
    t2 = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    marks: dict = {}
    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*args, **kwargs):
        s = time.perf_counter()
        out = encode(*args, **kwargs)
        _sync(device)
        marks.setdefault("encoded", time.perf_counter())
        marks.setdefault("encode_started", s)
        return out

    def timed_decode(*args, **kwargs):
        _sync(device)
        s = time.perf_counter()
        out = decode(*args, **kwargs)
        _sync(device)
        marks.setdefault("decode_started", s)
        marks.setdefault("decoded", time.perf_counter())
        return out

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    call = dict(payload["call"])
    call["negative_prompt"] = call.get("negative_prompt") or None

    def image():
        generator = torch.Generator(device=device).manual_seed(payload["seed"])
        out = pipe(**call, generator=generator, output_type="pil").images
        _sync(device)
        return out

    images = image()
    t3 = time.perf_counter()
    steady = None
    if payload.get("steady"):
        s = time.perf_counter()
        image()
        steady = round(time.perf_counter() - s, 3)
    first = {"text_encoding_seconds": marks["encoded"] - marks["encode_started"],
             "denoising_seconds": marks["decode_started"] - marks["encoded"],
             "vae_seconds": marks["decoded"] - marks["decode_started"]}
    phases = {"interpreter_seconds": _WALL_START - payload["spawned_at"], "imports_seconds": imported - _T_START,
              "config_seconds": t0 - imported, "from_pretrained_seconds": t1 - t0, "to_device_seconds": t2 - t1,
              **first, "first_image_other_seconds": (t3 - t2) - sum(first.values())}
    total = phases["interpreter_seconds"] + (t3 - _T_START)
    return {"time_to_first_image_seconds": round(t3 - _T_START, 3),
            "process_to_first_image_seconds": round(total, 3),
            "import_seconds": round(imported - _T_START, 3), "load_seconds": round(t2 - t0, 3),
            "first_image_seconds": round(t3 - t2, 3), "steady_image_seconds": steady,
            "images": len(images), "steps": call["num_inference_steps"], "device": device,
            "load": "from_pretrained, then .to(device)",
            "phases": {k: round(v, 3) for k, v in phases.items()},
            "other_seconds": round(total - sum(phases.values()), 3),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}


if __name__ == "__main__":
    print(MARK + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
