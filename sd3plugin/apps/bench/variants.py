"""One variant measured: a fresh copy of the transformer, optimized with the variant's config, warmed up,
timed, compared with eager, optionally swept over resolutions and started again in fresh processes."""
from __future__ import annotations

import copy
import gc
import shutil
import statistics
import time
from pathlib import Path

import torch

from ...compat import torch as tcompat
from ...config.step_cache import is_on

from .coldstart import process_first_image, shipped_cache_start
from .options import BenchConfig, label_slug, resolution_shapes
from .quality import quality_figures
from .timing import StepEvents, compiled_graphs, timed_call


def _fresh_transformer(master, device: str):
    t = copy.deepcopy(master)
    return t.to(device)


def _pipe_with(base_pipe, transformer):
    comps = dict(base_pipe.components)
    comps["transformer"] = transformer
    return type(base_pipe)(**comps)


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_variant(label: str, cfg, bench: BenchConfig, base_pipe, master, device: str, out: Path,
                eager_ref: dict | None, model_folder: str) -> tuple[dict, dict]:
    """Measure one variant (``cfg`` composed for it); ``eager_ref`` holds eager's latents/images."""
    import sd3plugin

    from ..metrics import peak_memory_gib, reset_peak_memory
    from ...pipeline import call_kwargs

    tcompat.reset_dynamo()
    sd3plugin.disable()  # restore global flags of the previous variant
    _free_memory(device)
    result: dict = {"label": label}
    cache_dir = None
    if bench.fresh_cache and cfg.backend != "eager":
        cache_dir = out / "caches" / label_slug(label)
        shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = copy.deepcopy(cfg)
        cfg.cache_dir = str(cache_dir)
    pipe = _pipe_with(base_pipe, _fresh_transformer(master, device))
    pipe.set_progress_bar_config(disable=True)

    t0 = time.perf_counter()
    step_cached = is_on(cfg.get("step_cache"))
    if cfg.backend != "eager" or step_cached:
        sd3plugin.optimize(pipe, cfg)
    result["setup_seconds"] = time.perf_counter() - t0
    rep = sd3plugin.report(pipe)
    rep.pop("config", None)
    result["optimization"] = rep

    graphs0 = compiled_graphs()
    reset_peak_memory(device)
    kwargs = call_kwargs(cfg)
    _, result["warmup_compile_seconds"] = timed_call(pipe, device, kwargs)
    result["warmup_peak_memory_gib"] = peak_memory_gib(device)
    for _ in range(bench.warmup - 1):
        timed_call(pipe, device, call_kwargs(cfg))
    result["graphs_first_shape"] = compiled_graphs() - graphs0
    status = sd3plugin.report(pipe).get("status")
    result["status"] = status or ("eager" if cfg.backend == "eager" else None)

    reset_peak_memory(device)
    steps, e2e, images = [], [], None
    for _ in range(bench.repeat):
        ev = StepEvents(device)
        out_obj, seconds = timed_call(pipe, device, {**call_kwargs(cfg), "callback_on_step_end": ev})
        steps += ev.step_seconds()
        e2e.append(seconds)
        images = out_obj.images
    result["peak_memory_gib"] = peak_memory_gib(device)
    if step_cached:  # the last timed call: steps and block computations cache-dit reused
        result["step_cache"] = sd3plugin.report(pipe).get("step_cache")
    result["step_seconds_median"] = statistics.median(steps) if steps else float("nan")
    result["iterations_per_second"] = 1.0 / result["step_seconds_median"] if steps else float("nan")
    result["e2e_seconds"] = statistics.median(e2e)
    result["e2e_all_seconds"] = e2e
    result["recompiles_steady"] = compiled_graphs() - graphs0 - result["graphs_first_shape"]

    latents = pipe(**call_kwargs(cfg, output_type="latent")).images.float().cpu()
    ref = {"latents": latents, "images": images}
    if bench.quality and eager_ref is not None and label != "eager":
        result["quality"] = quality_figures(ref, eager_ref, out, label)

    if bench.multiple_resolutions:
        result["resolutions"] = resolution_pass(pipe, cfg, bench, device)

    del pipe
    _free_memory(device)
    if cache_dir is not None:
        _fresh_process_starts(result, cfg, bench, cache_dir, out, label, model_folder)
    sd3plugin.disable()
    return result, ref


def _fresh_process_starts(result: dict, cfg, bench: BenchConfig, cache_dir: Path, out: Path, label: str,
                          model_folder: str) -> None:
    """The variant's first image in fresh processes (shipped cache, and cold with bench.cold_process)."""
    if bench.cache_warmup:
        result["cache_warm_start"] = shipped_cache_start(cfg, model_folder, out, label, bench)
    if bench.cold_process:
        cold_dir = out / "caches" / (label_slug(label) + "-cold")
        shutil.rmtree(cold_dir, ignore_errors=True)
        result["cold_start"] = process_first_image(cfg, model_folder, cold_dir, out, label + "-cold", bench)
        shutil.rmtree(cold_dir, ignore_errors=True)
    if not bench.keep_caches:
        shutil.rmtree(cache_dir, ignore_errors=True)


def resolution_pass(pipe, cfg, bench: BenchConfig, device: str) -> list[dict]:
    """First call at every shape: seconds, and graphs newly compiled (recompilations) at that shape."""
    from ...pipeline import call_kwargs

    rows = []
    for h, w in resolution_shapes(bench, cfg.model):
        g0 = compiled_graphs()
        _, seconds = timed_call(pipe, device, call_kwargs(cfg, height=h, width=w, steps=bench.resolution_steps,
                                                          output_type="latent"))
        rows.append({"height": h, "width": w, "first_call_seconds": seconds, "new_graphs": compiled_graphs() - g0})
    return rows
