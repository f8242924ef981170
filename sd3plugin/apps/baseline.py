"""``verify --baseline``: plain diffusers' eager start on the same machine, and the comparison with ours.

The baseline runs ``baseline_child.py`` as a script in a fresh process (torch and diffusers only, no
sd3plugin), same model folder, dtype, device, resolution, batch, steps, prompt and seed as the warm start.
Both processes are timed from the moment the parent starts them to the end of the first image
(``process_to_first_image_seconds``); ``ratio`` is ours / baseline.

``package_seconds`` is the plugin's own share of our start: our process-to-first-image time less what
any diffusers program pays (the own import time of torch, diffusers and transformers, the component loads
that read the weights) and less one steady image (the image itself, measured as a second image in the same
process). ``package_breakdown`` lists each term.

Page cache: before each process the weight files are either read once (``warm``: both start from memory)
or evicted (``dropped``: ``/proc/sys/vm/drop_caches`` where writable, else ``posix_fadvise(DONTNEED)`` on
every file of the model folder, which the kernel honours for clean pages).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..cache.errors import CacheError
from ..startup import parse_importtime

MARK = "sd3plugin_baseline="
CHILD = Path(__file__).with_name("baseline_child.py")
ENV_PACKAGES = ("torch", "diffusers", "transformers")  # imports every diffusers SD3 program pays
PAGE_CACHE_STATES = ("warm", "dropped")


def _weight_files(folder: str) -> list[Path]:
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def set_page_cache(folder: str, state: str, whole_machine: bool = True) -> dict:
    """Put the model folder's files in the page cache (``warm``) or out of it (``dropped``); what was done.
    ``whole_machine=False``: never write ``drop_caches`` (only this folder's files are evicted)."""
    files = _weight_files(folder)
    started = time.perf_counter()
    if state == "warm":
        for p in files:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        how = "read once"
    elif state == "dropped":
        how = "posix_fadvise DONTNEED"
        try:
            if whole_machine:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                how = "drop_caches"
        except OSError:
            pass
        if how != "drop_caches":
            for p in files:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    else:
        raise ValueError(f"page cache state {state!r}: one of {', '.join(PAGE_CACHE_STATES)}")
    return {"state": state, "how": how, "files": len(files), "seconds": round(time.perf_counter() - started, 3)}


def baseline_payload(cfg, shape: dict, steps: int | None) -> dict:
    """What the baseline child needs: the same folder, dtype, device and call as the warm start."""
    from ..config.resolve import resolve_device, resolve_dtype
    from ..pipeline import call_kwargs, dtype_kwarg, model_path

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    kw = call_kwargs(cfg, height=shape["height"], width=shape["width"], steps=steps)
    call = {k: kw[k] for k in ("prompt", "negative_prompt", "height", "width", "num_inference_steps",
                               "guidance_scale")}
    call["num_images_per_prompt"] = shape["batch_size"]
    if not shape.get("guidance", True):
        call["guidance_scale"] = 1.0
    return {"folder": model_path(cfg), "dtype": str(dtype).split(".")[-1], "dtype_kwarg": dtype_kwarg(),
            "device": device, "call": call, "seed": int(cfg.seed), "steady": True}


def run_baseline(payload: dict, timeout: float | None = None) -> dict:
    """Start plain diffusers in a fresh process; its result with ``startup.imports`` (``-X importtime``)."""
    payload = {**payload, "spawned_at": time.time()}
    try:
        proc = subprocess.run([sys.executable, "-X", "importtime", str(CHILD), json.dumps(payload)],
                              capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        raise CacheError(f"the baseline process (plain diffusers) did not finish within --timeout {timeout:g} s") \
            from None
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise CacheError(f"the baseline process (plain diffusers) failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(line[len(MARK):])
    result["startup"] = {"imports": parse_importtime(proc.stderr or "")}
    return result


def _import_seconds(imports: dict, packages=ENV_PACKAGES) -> float:
    return sum(r["seconds"] for r in (imports or {}).get("top", []) if r["module"] in packages)


def package_share(ours: dict) -> dict:
    """The plugin's own seconds of our start and the terms taken out (see the module docstring)."""
    startup = ours.get("startup") or {}
    env_imports = _import_seconds(startup.get("imports") or {})
    weights = sum(((startup.get("load") or {}).get("components") or {}).values())
    image = ours.get("steady_image_seconds") or 0.0
    total = ours["process_to_first_image_seconds"]
    return {"package_seconds": round(max(total - env_imports - weights - image, 0.0), 3),
            "package_breakdown": {"process_to_first_image_seconds": total,
                                  "imports_torch_diffusers_transformers_seconds": round(env_imports, 3),
                                  "component_loads_seconds": round(weights, 3),
                                  "steady_image_seconds": image}}


def compare(ours: dict, baseline: dict) -> dict:
    """``ratio`` (ours / baseline, process start to first image, both measured) and the package share."""
    ratio = ours["process_to_first_image_seconds"] / baseline["process_to_first_image_seconds"]
    return {"ratio": round(ratio, 3), **package_share(ours)}


def summary_text(result: dict) -> str:
    """One line for verify's text output."""
    b = result["baseline"]
    return (f"baseline (plain diffusers, eager): process to first image {b['process_to_first_image_seconds']:.2f} s "
            f"(import {b['import_seconds']:.2f} s, load {b['load_seconds']:.2f} s, first image "
            f"{b['first_image_seconds']:.2f} s); ours {result['process_to_first_image_seconds']:.2f} s, ratio "
            f"{result['ratio']:.2f}; package_seconds {result['package_seconds']:.2f} "
            f"(page cache {result.get('page_cache', {}).get('state', 'as found')})")
