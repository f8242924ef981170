"""``sd3plugin-bench``: eager against one or more configured variants, in one process, on the same inputs.

    sd3plugin-bench model=sd3-medium "bench.variants='mode=default; fp8=mode=max-autotune quant=fp8_e4m3_e4m3_dynamic'"
    sd3plugin-bench model=sd3-medium --compiler-config '{"mode": "max-optimize", "dynamic": true}' \
        --run_multiple_resolutions 1

Each variant is a set of overrides on top of the command line's config (``"LABEL=overrides"`` names it:
``'fp8=quant=fp8_e4m3_e4m3_dynamic mode=max-autotune'``; a plain ``mode=default`` is its own label). For
every variant it measures iteration speed (CUDA events between denoising steps, median), end-to-end time of
a full pipeline call (median of ``bench.repeat`` calls), peak memory, warm-up with compilation (first call,
fresh compile cache), warm-up from the cache that compile left (a fresh process), the error against eager
(latents and images) and, with ``bench.multiple_resolutions``, the first-call time and the number of new
graphs compiled at every shape. Results: ``bench.json``, ``bench.md`` and ``bench.png`` in output_dir.

``bench.*`` keys are the benchmark's own (see ``BenchConfig``); they are taken out of the command line
before Hydra composes the plugin config.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ..errors import ConfigError

log = logging.getLogger("sd3plugin")

# The command line as the user gave it (main() records it; Hydra later sees only the translated rest).
COMMAND_LINE: list[str] = []

# The seed script's --run_multiple_resolutions list, used in each dimension (7 x 7 shapes).
SEED_RESOLUTIONS = [1536, 1024, 768, 720, 576, 512, 256]


@dataclass
class BenchConfig:
    """The benchmark's own settings (``bench.<key>=value`` on the command line)."""

    # Override sets to compare with eager: a list of strings or a mapping label -> overrides.
    variants: Any = field(default_factory=lambda: [""])  # "": the command line's config as it is
    eager: bool = True               # measure the eager baseline first (ratios need it)
    warmup: int = 1                  # warm-up calls before timing (the first one compiles)
    repeat: int = 3                  # timed full pipeline calls (e2e median; steps of all calls for it/s)
    multiple_resolutions: bool = False
    resolutions: list[int] = field(default_factory=lambda: list(SEED_RESOLUTIONS))
    square_only: bool = False        # only (r, r) instead of every (height, width) pair
    resolution_steps: Optional[int] = None  # denoising steps of each per-shape call (default: steps)
    cache_warmup: bool = True        # warm start from a shipped cache (sd3plugin-cache warm/pack/install/verify)
    cold_process: bool = False       # also measure the cold first image in a fresh process (empty cache)
    fresh_cache: bool = True         # compile each variant into an empty cache dir (true cold numbers)
    keep_caches: bool = False        # keep those cache dirs under output_dir/caches
    quality: bool = True             # error of latents/images against eager
    chart: bool = True               # bench.png (needs matplotlib)
    subprocess_timeout: int = 1800


BENCH_KEYS = tuple(BenchConfig.__dataclass_fields__)


def split_bench_overrides(argv: list[str]) -> tuple[BenchConfig, list[str]]:
    """Take ``bench.*`` overrides out of ``argv``; return the validated BenchConfig and the rest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    bench_args, rest = [], []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        (bench_args if key.startswith("bench.") and "=" in arg else rest).append(arg)
    values: dict = {}
    parser = OverridesParser.create()
    for arg in bench_args:
        try:
            ov = parser.parse_overrides([arg.lstrip("+")])[0]
        except Exception as exc:
            raise ConfigError(f"cannot parse {arg!r}: {exc}") from None
        key = ov.key_or_group.split(".", 1)[1]
        if key not in BENCH_KEYS:
            raise ConfigError(f"unknown benchmark key bench.{key}; valid keys: "
                              + ", ".join(f"bench.{k}" for k in BENCH_KEYS))
        values[key] = ov.value()
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), values)
    except Exception as exc:
        raise ConfigError(f"invalid benchmark setting: {str(exc).splitlines()[0]}") from None
    bench = OmegaConf.to_object(cfg)
    parse_variants(bench.variants)  # fail early on a malformed variant list
    if bench.repeat < 1 or bench.warmup < 1:
        raise ConfigError(f"bench.repeat and bench.warmup must be at least 1 (got {bench.repeat}, "
                          f"{bench.warmup}): the first call compiles, the timed calls come after it")
    return bench, rest


def parse_variants(variants) -> list[tuple[str, list[str]]]:
    """[(label, overrides)] from ``"[LABEL=]k=v k=v; ..."`` (a string, or a list of such strings; Hydra
    needs each list element quoted) or a mapping label -> overrides."""
    if variants is None:
        return []
    if isinstance(variants, str):  # 'mode=default; fp8=quant=... mode=max-autotune'
        variants = [v for v in variants.split(";") if v.strip()]
    if isinstance(variants, dict):
        items = [(str(k), v) for k, v in variants.items()]
    elif isinstance(variants, (list, tuple)):
        items = []
        for v in variants:
            text = str(v).strip()
            first = text.split(None, 1)[0] if text else ""
            label, _, after = first.partition("=")
            # 'fp8=quant=x mode=y': a first word with two '=' names the variant.
            if "=" in after and "." not in label:
                items.append((label, text[len(label) + 1:]))
            else:
                items.append((text or "configured", text))
    else:
        raise ConfigError(f"bench.variants must be a list of override strings or a mapping label -> "
                          f"overrides, got {variants!r}")
    out = []
    for label, overrides in items:
        ovs = overrides.split() if isinstance(overrides, str) else [str(o) for o in overrides]
        for o in ovs:
            if "=" not in o:
                raise ConfigError(f"variant {label!r}: {o!r} is not an override (key=value)")
            if o.split("=", 1)[0].lstrip("+~") in ("model", "device", "dtype", "cache_dir"):
                raise ConfigError(f"variant {label!r} sets {o!r}; model, device, dtype and cache_dir are "
                                  "shared by all variants: set them once on the command line")
        out.append((label, ovs))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bench.variants has duplicate labels {labels}; name them with LABEL=overrides")
    return out


def resolution_shapes(bench: BenchConfig, model: str) -> list[tuple[int, int]]:
    """The (height, width) pairs of the multiple-resolution pass, checked against the model."""
    from ..models import check_resolution

    sizes = list(dict.fromkeys(int(r) for r in bench.resolutions))
    for r in sizes:
        check_resolution(model, r, r)
    if bench.square_only:
        return [(r, r) for r in sizes]
    return [(h, w) for h in sizes for w in sizes]


# ---------------------------------------------------------------------------------------------------------
# timing
class StepEvents:
    """``callback_on_step_end`` recording a CUDA event (or a host clock on CPU) after every step."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list = []

    def mark(self):
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.mark()
        return callback_kwargs

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive steps (the first step, which follows text encoding, left out)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (new shapes that recompile add to it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_call(pipe, device: str, kwargs: dict):
    _sync(device)
    t0 = time.perf_counter()
    out = pipe(**kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# one variant
def _fresh_transformer(master, device: str):
    t = copy.deepcopy(master)
    return t.to(device)


def _pipe_with(base_pipe, transformer):
    comps = dict(base_pipe.components)
    comps["transformer"] = transformer
    return type(base_pipe)(**comps)


def run_variant(label: str, cfg, bench: BenchConfig, base_pipe, master, device: str, out: Path,
                eager_ref: dict | None, model_folder: str) -> tuple[dict, dict]:
    """Measure one variant (``cfg`` composed for it); ``eager_ref`` holds eager's latents/images."""
    import sd3plugin

    from .metrics import peak_memory_gib, reset_peak_memory
    from ..pipeline import call_kwargs

    torch._dynamo.reset()
    sd3plugin.disable()  # restore global flags of the previous variant
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    result: dict = {"label": label}
    cache_dir = None
    if bench.fresh_cache and cfg.backend != "eager":
        cache_dir = out / "caches" / _slug(label)
        shutil.rmtree(cache_dir, ignore_errors=True)
        cfg = copy.deepcopy(cfg)
        cfg.cache_dir = str(cache_dir)
    pipe = _pipe_with(base_pipe, _fresh_transformer(master, device))
    pipe.set_progress_bar_config(disable=True)

    t0 = time.perf_counter()
    if cfg.backend != "eager":
        sd3plugin.optimize(pipe, cfg)
    result["setup_seconds"] = time.perf_counter() - t0
    rep = sd3plugin.report(pipe)
    rep.pop("config", None)
    result["optimization"] = rep

    graphs0 = compiled_graphs()
    reset_peak_memory(device)
    kwargs = call_kwargs(cfg)
    _, result["warmup_compile_seconds"] = _timed_call(pipe, device, kwargs)
    result["warmup_peak_memory_gib"] = peak_memory_gib(device)
    for _ in range(bench.warmup - 1):
        _timed_call(pipe, device, call_kwargs(cfg))
    result["graphs_first_shape"] = compiled_graphs() - graphs0
    status = sd3plugin.report(pipe).get("status")
    result["status"] = status or ("eager" if cfg.backend == "eager" else None)

    reset_peak_memory(device)
    steps, e2e, images = [], [], None
    for _ in range(bench.repeat):
        ev = StepEvents(device)
        out_obj, seconds = _timed_call(pipe, device, {**call_kwargs(cfg), "callback_on_step_end": ev})
        steps += ev.step_seconds()
        e2e.append(seconds)
        images = out_obj.images
    result["peak_memory_gib"] = peak_memory_gib(device)
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
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if cache_dir is not None:
        if bench.cache_warmup:
            result["cache_warm_start"] = shipped_cache_start(cfg, model_folder, out, label, bench)
        if bench.cold_process:
            cold_dir = out / "caches" / (_slug(label) + "-cold")
            shutil.rmtree(cold_dir, ignore_errors=True)
            result["cold_start"] = process_first_image(cfg, model_folder, cold_dir, out, label + "-cold", bench)
            shutil.rmtree(cold_dir, ignore_errors=True)
        if not bench.keep_caches:
            shutil.rmtree(cache_dir, ignore_errors=True)
    sd3plugin.disable()
    return result, ref


def resolution_pass(pipe, cfg, bench: BenchConfig, device: str) -> list[dict]:
    """First call at every shape: seconds, and graphs newly compiled (recompilations) at that shape."""
    from ..pipeline import call_kwargs

    rows = []
    for h, w in resolution_shapes(bench, cfg.model):
        g0 = compiled_graphs()
        _, seconds = _timed_call(pipe, device, call_kwargs(cfg, height=h, width=w, steps=bench.resolution_steps,
                                                           output_type="latent"))
        rows.append({"height": h, "width": w, "first_call_seconds": seconds, "new_graphs": compiled_graphs() - g0})
    return rows


def quality_figures(ref: dict, eager: dict, out: Path, label: str) -> dict:
    """Relative error of latents, PSNR/SSIM of images against eager (sd3plugin.apps.quality); a grid PNG."""
    from . import quality

    figs = {f"latents_{k}": v for k, v in quality.compare_latents(eager["latents"], ref["latents"]).items()}
    if ref["images"] and eager["images"]:
        try:
            img = quality.compare_images(eager["images"], ref["images"])
            figs.update(images_psnr_db=img["psnr"], images_ssim=img["ssim"])
        except ImportError as exc:  # scikit-image missing: PSNR still
            figs["images_psnr_db"] = float(sum(quality.psnr(a, b) for a, b in zip(
                quality.to_arrays(eager["images"]), quality.to_arrays(ref["images"]))) / len(ref["images"]))
            figs["images_ssim_error"] = str(exc)
        try:
            path = quality.save_grid(eager["images"], ref["images"], out / f"grid_{_slug(label)}.png",
                                     labels=[f"{label} #{i}" for i in range(len(ref["images"]))])
            figs["grid"] = str(path)
        except Exception as exc:  # a grid is a nicety; the numbers matter
            log.warning("sd3plugin-bench: grid not written: %s", exc)
    figs["weights"] = "random"
    return figs


def _cli_json(cmd: list[str], env: dict, timeout: int) -> tuple[int, dict, str]:
    """Run one ``sd3plugin-cache ... --json`` command: (exit code, its JSON object, stderr tail)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    text = proc.stdout.strip()
    try:
        data = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError:
        data = {}
    return proc.returncode, data, "\n".join((proc.stderr or "").strip().splitlines()[-5:])


def shipped_cache_start(cfg, model_folder: str, out: Path, label: str, bench: BenchConfig) -> dict:
    """Warm start from a shipped cache, as users do it: ``sd3plugin-cache warm`` into an empty dir,
    ``pack``, ``install`` into another empty dir, ``verify`` (each a fresh process). Falls back to a
    fresh ``sd3plugin-run`` on the variant's own cache when the cache CLI is not there."""
    import importlib.util

    from ..pipeline import resolution

    if importlib.util.find_spec("sd3plugin.cli.cmd_verify") is None:
        return process_first_image(cfg, model_folder, out / "caches" / _slug(label), out, label, bench)
    root = out / "caches" / f"{_slug(label)}-shipped"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ci, serve, archive = root / "ci", root / "installed", root / "cache.tar.zst"
    ovs = variant_command_overrides(cfg) + [f"model={model_folder}"]
    h, w = resolution(cfg)
    cli = [sys.executable, "-m", "sd3plugin.cli.cache"]
    steps = [
        ("warm", ["warm", "--json", "--no-progress", "--cache-dir", str(ci), "--resolutions", f"{w}x{h}",
                  "--batch-sizes", str(cfg.num_images), *ovs]),
        ("pack", ["pack", "--json", "--cache-dir", str(ci), "-o", str(archive)]),
        ("install", ["install", "--json", str(archive), "--cache-dir", str(serve)]),
        ("verify", ["verify", "--json", "--cache-dir", str(serve), *ovs]),
    ]
    env = _child_env()
    info: dict = {"method": "sd3plugin-cache warm/pack/install/verify"}
    try:
        for name, args in steps:
            t0 = time.perf_counter()
            code, data, err = _cli_json(cli + args, env, bench.subprocess_timeout)
            info[f"{name}_process_seconds"] = time.perf_counter() - t0
            if code != 0:
                info["error"] = f"sd3plugin-cache {name} exited {code}: {data.get('error') or err}"
                log.warning("sd3plugin-bench: %s: %s", label, info["error"])
                return info
            if name == "pack":
                info["archive_bytes"] = data.get("archive_bytes")
            if name == "verify":
                info.update(first_call_seconds=data.get("first_image_seconds"),
                            load_seconds=data.get("load_seconds"), import_seconds=data.get("import_seconds"),
                            time_to_first_image_seconds=data.get("time_to_first_image_seconds"),
                            fresh_compilations=data.get("fresh_compilations"),
                            fxgraph_cache_hit=data.get("fxgraph_cache_hit"),
                            precompiled_used=bool((data.get("precompiled") or {}).get("used")),
                            startup=data.get("startup"))
    finally:
        if not bench.keep_caches:
            shutil.rmtree(root, ignore_errors=True)
    return info


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH", "")]))
    return env


def process_first_image(cfg, model_folder: str, cache_dir: Path, out: Path, label: str,
                        bench: BenchConfig) -> dict:
    """Time to the first image in a fresh ``sd3plugin-run`` process using ``cache_dir`` (as shipped)."""
    run_dir = out / "runs" / _slug(label)
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = variant_command_overrides(cfg) + [f"model={model_folder}", f"cache_dir={cache_dir}",
                                                  f"output_dir={run_dir}", "hydra.run.dir=" + str(run_dir)]
    cmd = [sys.executable, "-m", "sd3plugin", *overrides]
    env = _child_env()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=bench.subprocess_timeout)
    wall = time.perf_counter() - t0
    info = {"command": " ".join(cmd), "exit_code": proc.returncode, "process_seconds": wall}
    report_file = run_dir / "report.json"
    if proc.returncode != 0 or not report_file.is_file():
        info["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        log.warning("sd3plugin-bench: %s warm start failed: %s", label, info["error"])
        return info
    rep = json.loads(report_file.read_text())
    info.update(load_seconds=rep.get("load_seconds"), first_call_seconds=rep.get("warmup_seconds"),
                first_image_seconds=(rep.get("load_seconds") or 0) + (rep.get("warmup_seconds") or 0))
    return info


def variant_command_overrides(cfg) -> list[str]:
    """The overrides that rebuild ``cfg``'s optimization settings on a command line."""
    c = OmegaConf.to_container(cfg, resolve=True)
    ovs = [f"backend={c['backend']}", f"mode.spec='{c['mode']['spec']}'",
           f"memory_format={c['memory_format']['name']}", f"dynamic={'true' if c['dynamic']['enabled'] else 'false'}",
           f"quant={c['quant']['type']}", f"fuse_qkv={str(c['fuse_qkv']).lower()}",
           f"fuse_gelu={str(c['fuse_gelu']).lower()}",
           f"compile_vae={str(c['compile_vae']).lower()}", f"device={c['device']}", f"dtype={c['dtype']}",
           f"steps={c['steps']}", f"seed={c['seed']}", f"guidance_scale={c['guidance_scale']}",
           f"num_images={c['num_images']}", f"attention={c['attention']}", "prompt=" + _quoted(c["prompt"])]
    q = c["quant"]
    if q.get("submodules_config_path"):
        ovs += ["quant.submodules_config_path=" + _quoted(q["submodules_config_path"]),
                f"quant.top_percentage={q['top_percentage']}"]
    for key in ("include", "exclude"):
        if q.get(key):
            ovs.append(f"quant.{key}=" + json.dumps(q[key]))
    if c.get("negative_prompt"):
        ovs.append("negative_prompt=" + _quoted(c["negative_prompt"]))
    if c.get("height"):
        ovs.append(f"height={c['height']}")
    if c.get("width"):
        ovs.append(f"width={c['width']}")
    for k, v in (c.get("backend_options") or {}).items():
        ovs.append(f"+backend_options.{k}={json.dumps(v)}")
    return ovs


def _quoted(text: str) -> str:
    return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _slug(label: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return keep.strip("_")[:60] or "variant"


# ---------------------------------------------------------------------------------------------------------
# the whole benchmark
def run_bench(cfg, bench: BenchConfig) -> dict:
    """Load the pipeline once, measure eager and every variant, write bench.json/.md/.png."""
    from ..config import compose
    from ..config.resolve import resolve_device
    from ..pipeline import load_pipeline, model_path, output_dir
    from .bench_report import write_outputs

    out = output_dir(cfg)
    device = resolve_device(cfg.device)
    variants = parse_variants(bench.variants)
    if bench.multiple_resolutions:
        resolution_shapes(bench, cfg.model)  # invalid sizes fail before loading anything
    composed = [(label, compose(cfg, ovs), ovs) for label, ovs in variants]
    check_shared_dtype(cfg, composed, device)

    t0 = time.perf_counter()
    folder = model_path(cfg)
    model_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_pipe = load_pipeline(_eager(cfg))
    load_seconds = time.perf_counter() - t0
    master = base_pipe.transformer.to("cpu") if device == "cuda" else base_pipe.transformer
    if device != "cuda":
        master = copy.deepcopy(master)

    results = []
    eager_ref = None
    plan = ([("eager", _eager(cfg), ["backend=eager"])] if bench.eager else []) + composed
    if not plan:
        raise ConfigError("nothing to measure: bench.eager=false and bench.variants is empty")
    for label, vcfg, ovs in plan:
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
            log.info("sd3plugin-bench: %s: %.2f it/s, e2e %.3f s", label, res["iterations_per_second"],
                     res["e2e_seconds"])
        add_ratios(results)
        data = _summary(cfg, bench, folder, model_seconds, load_seconds, device, base_pipe, results)
        write_outputs(data, out, chart=bench.chart, quiet=True)  # partial results survive a crash
    write_outputs(data, out, chart=bench.chart)
    return data


def _summary(cfg, bench, folder, model_seconds, load_seconds, device, base_pipe, results) -> dict:
    from .run import versions
    from ..pipeline import call_kwargs

    kw = call_kwargs(cfg)
    return {
        "model": cfg.model, "model_folder": folder, "model_build_seconds": model_seconds,
        "load_seconds": load_seconds, "device": device, "dtype": str(base_pipe.transformer.dtype),
        "height": kw["height"], "width": kw["width"], "steps": kw["num_inference_steps"],
        "guidance_scale": kw["guidance_scale"], "num_images": cfg.num_images,
        "versions": versions(), "command": " ".join(["sd3plugin-bench", *map(_shell_quote, COMMAND_LINE or sys.argv[1:])]),
        "bench": OmegaConf.to_container(OmegaConf.structured(bench)), "variants": results,
    }


def check_shared_dtype(cfg, composed, device: str) -> None:
    """All variants run on one loaded pipeline: a variant whose quant preset needs another dtype (per-row
    fp8 wants bfloat16) is refused before anything loads, with the fix."""
    from ..config.resolve import resolve_dtype

    base = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    for label, vcfg, _ in composed:
        need = resolve_dtype(vcfg.dtype, device, vcfg.quant.type)
        if need != base:
            raise ConfigError(f"variant {label!r} (quant={vcfg.quant.type}) needs dtype "
                              f"{str(need).split('.')[-1]} but the shared pipeline loads "
                              f"{str(base).split('.')[-1]}; set dtype={str(need).split('.')[-1]} on the command "
                              "line so that eager and every variant use it")


def _eager(cfg):
    """The command line's config run eagerly (no compilation, no quantization), in the dtype it resolves to."""
    from ..config.resolve import resolve_device, resolve_dtype

    c = copy.deepcopy(cfg)
    c.dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device), cfg.quant.type)).split(".")[-1]
    c.backend = "eager"
    c.quant.type = "none"
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


def _task_factory(bench: BenchConfig):
    def task(cfg) -> None:
        from ..config import validate

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("sd3plugin").setLevel(logging.INFO)
        try:
            validate(cfg)
            run_bench(cfg, bench)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    return task


def main(argv: list[str] | None = None) -> None:
    from .run import prepare_argv, run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    COMMAND_LINE[:] = argv
    try:
        bench, rest = split_bench_overrides(prepare_argv(argv, bench=True))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_hydra(_task_factory(bench), rest, bench=True)


if __name__ == "__main__":
    main()
