"""The whole benchmark: load the pipeline once, measure eager and every variant, write the results."""
from __future__ import annotations

import copy
import logging
import shlex
import sys
import time

from omegaconf import OmegaConf

from ...errors import ConfigError
from ..interrupt import raise_if_dropped
from .options import COMMAND_LINE, BenchConfig, check_shared_dtype, parse_variants, resolution_shapes
from . import step_cache
from .variants import run_variant

log = logging.getLogger("sd3plugin")


def run_bench(cfg, bench: BenchConfig) -> dict:
    """Load the pipeline once, measure eager and every variant, write bench.json/.md/.png."""
    from ...config import compose
    from ...config.resolve import resolve_device
    from ...pipeline import load_pipeline, model_path, output_dir
    from .report import write_outputs

    out = output_dir(cfg)
    device = resolve_device(cfg.device)
    variants = step_cache.with_step_caches(parse_variants(bench.variants),
                                           step_cache.step_cache_presets(bench.step_cache))
    if bench.multiple_resolutions:
        resolution_shapes(bench, cfg.model)  # invalid sizes fail before loading anything
    composed = [(label, compose(cfg, ovs), ovs) for label, ovs in variants]
    check_shared_dtype(cfg, composed, device)

    t0 = time.perf_counter()
    folder = model_path(cfg)
    model_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_pipe = load_pipeline(eager_config(cfg))
    load_seconds = time.perf_counter() - t0
    master = base_pipe.transformer.to("cpu") if device == "cuda" else copy.deepcopy(base_pipe.transformer)

    results = []
    eager_ref = None
    measured, refs = {}, {}  # label -> config, label -> latents/images: uncached partners of step-cache variants
    plan = ([("eager", eager_config(cfg), ["backend=eager"])] if bench.eager else []) + composed
    if not plan:
        raise ConfigError("nothing to measure: bench.eager=false and bench.variants is empty")
    for label, vcfg, ovs in plan:
        raise_if_dropped()  # a Ctrl-C that Python dropped during the last variant stops here
        log.info("sd3plugin-bench: measuring %s", label)
        try:
            res, ref = run_variant(label, vcfg, bench, base_pipe, master, device, out, eager_ref, folder)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            log.exception("sd3plugin-bench: %s failed", label)
            res, ref = {"label": label, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"}, None
            import sd3plugin

            sd3plugin.disable()
        res["overrides"] = list(ovs)
        if label == "eager":
            eager_ref = ref
        results.append(res)
        if "error" not in res:
            measured[label], refs[label] = vcfg, ref
            _step_cache_figures(results, measured, refs, out, bench.quality)
        if "error" not in res:
            log.info("sd3plugin-bench: %s: %.2f it/s, e2e %.3f s", label, res["iterations_per_second"],
                     res["e2e_seconds"])
        add_ratios(results)
        data = _summary(cfg, bench, folder, model_seconds, load_seconds, device, base_pipe, results)
        data["complete"] = False  # until every variant is measured (a crash or Ctrl-C leaves it so)
        write_outputs(data, out, chart=bench.chart, quiet=True)  # partial results survive a crash
    data["complete"] = True
    write_outputs(data, out, chart=bench.chart)
    written = ", ".join(name for name in ("bench.md", "bench.json", "bench.png") if (out / name).is_file())
    print(f"sd3plugin-bench: wrote {written} to {out.resolve()}", flush=True)
    return data


def _step_cache_figures(results: list[dict], measured: dict, refs: dict, out, quality: bool) -> None:
    """Each step-cache variant against the uncached image of the same seed, once its partner is measured."""
    from ...config.step_cache import is_on

    by_label = {r["label"]: r for r in results}
    for r in results:
        label = r["label"]
        if label not in measured or not is_on(measured[label].get("step_cache")) or \
                (r.get("step_cache") or {}).get("against"):
            continue
        partner = step_cache.uncached_partner(label, measured[label], measured)
        if partner is not None:
            step_cache.add_figures(r, refs[label], by_label[partner], refs[partner], out, quality,
                                   measured[label].get("prompt"))


def _summary(cfg, bench, folder, model_seconds, load_seconds, device, base_pipe, results) -> dict:
    from ..run_report import versions
    from ...pipeline import call_kwargs

    kw = call_kwargs(cfg)
    return {
        "model": cfg.model, "model_folder": folder, "model_build_seconds": model_seconds,
        "load_seconds": load_seconds, "device": device, "dtype": str(base_pipe.transformer.dtype),
        "height": kw["height"], "width": kw["width"], "steps": kw["num_inference_steps"],
        "guidance_scale": kw["guidance_scale"], "num_images": cfg.num_images,
        "versions": versions(),
        "command": " ".join(["sd3plugin-bench", *map(shlex.quote, COMMAND_LINE or sys.argv[1:])]),
        "bench": OmegaConf.to_container(OmegaConf.structured(bench)), "variants": results,
    }


def eager_config(cfg):
    """The command line's config run eagerly (no compilation, no quantization, no step cache), in the dtype it
    resolves to."""
    from ...config.resolve import resolve_device, resolve_dtype
    from ...config.step_cache import preset_node

    c = copy.deepcopy(cfg)
    c.dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device), cfg.quant.type)).split(".")[-1]
    c.backend = "eager"
    c.quant.type = "none"
    if "step_cache" in c:
        c.step_cache = OmegaConf.merge(c.step_cache, preset_node("none"))
    return c


def add_ratios(results: list[dict]) -> None:
    """Speed-up of it/s and e2e and memory ratio of every variant against eager (when measured)."""
    eager = next((r for r in results if r["label"] == "eager" and "error" not in r), None)
    for r in results:
        if eager is None or "error" in r:
            continue
        r["its_ratio"] = r["iterations_per_second"] / eager["iterations_per_second"]
        r["e2e_ratio"] = r["e2e_seconds"] / eager["e2e_seconds"]
        r["memory_ratio"] = r["peak_memory_gib"] / eager["peak_memory_gib"] if eager["peak_memory_gib"] else None
