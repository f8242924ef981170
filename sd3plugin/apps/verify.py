"""``verify``: prove the warm start in a fresh process.

The parent starts ``python -m sd3plugin.apps.verify`` so nothing compiled in the calling process can
help; the child loads the configured pipeline with the cache, makes one image and reports time to
first image, fresh compilations (inductor FX-graph cache misses and bypasses), cache hits and where the
time went (``startup``: the child runs under ``python -X importtime`` for the heaviest imports; the rest
is ``report(pipe)["startup"]``, see ``sd3plugin.startup``).
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()
_WALL_START = time.time()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from ..cache.errors import CacheError, CacheNotFoundError, NothingCompiledError  # noqa: E402
from ..startup import parse_importtime  # noqa: E402

MARK = "sd3plugin_verify="
ERROR_MARK = "sd3plugin_verify_error="  # the child's one-line error, when it cannot give a result


def select_entry(cfg) -> dict:
    """The entry of ``cfg``'s fingerprint in its cache dir; CacheNotFoundError naming what is there."""
    from ..cache import store
    from ..cache.manifest import fingerprint

    root = Path(cfg.cache_dir).expanduser()
    fp = fingerprint(cfg)
    entries = store.list_entries(root)
    for e in entries:
        if e.get("fingerprint") == fp:
            return e
    if not entries:
        raise CacheNotFoundError(f"no compile cache in {str(root)!r}; install one (`sd3plugin-cache install "
                                 "ARCHIVE`) or warm one (`sd3plugin-cache warm`)")
    present = ", ".join(f"{e['fingerprint']} ({_describe(e)})" for e in entries)
    raise CacheNotFoundError(f"no cache entry for this config (fingerprint {fp}) in {str(root)!r}; present: "
                             f"{present}. Give the same overrides as for warm")


def _describe(entry: dict) -> str:
    c = entry.get("config", {})
    return f"model={c.get('model')} mode={c.get('mode', {}).get('spec')!r} device={c.get('device')}"


def default_shape(cfg) -> dict:
    from ..pipeline import resolution

    h, w = resolution(cfg)
    return {"width": w, "height": h, "batch_size": int(cfg.num_images), "guidance": cfg.guidance_scale > 1}


def verify(cfg, overrides: list[str], shape: dict | None = None, steps: int | None = None,
           timeout: float | None = None, cold: bool = False, baseline: bool = False,
           page_cache: str | None = None) -> dict:
    """Run the warm start in a child process; raise NothingCompiledError if it compiled anything.

    ``cold``: the reference to compare with: the child compiles into empty inductor/Triton dirs
    (no entry needed; compilations are expected and not an error).
    ``baseline``: then start plain diffusers (eager) the same way and add ``baseline``, ``ratio`` and
    ``package_seconds`` (``apps.baseline``); ``page_cache`` (warm / dropped) is set before each process.
    """
    entry = None if cold else select_entry(cfg)
    if shape is None:
        shape = dict(entry["shapes"][0]) if entry else default_shape(cfg)
    payload = {"overrides": list(overrides), "cache_dir": str(cfg.cache_dir), "shape": shape,
               "steps": steps, "cold": cold, "steady": baseline}
    from .baseline import baseline_payload, set_page_cache

    base_payload = baseline_payload(cfg, shape, steps)
    state = set_page_cache(base_payload["folder"], page_cache) if page_cache else None
    result = _run_child(payload, timeout, entry, cold, shape)
    if state:
        result["page_cache"] = state
    if baseline:
        from .baseline import compare, run_baseline

        if page_cache:
            result["baseline_page_cache"] = set_page_cache(base_payload["folder"], page_cache)
        result["baseline"] = run_baseline(base_payload, timeout)
        result.update(compare(result, result["baseline"]))
    if result["fresh_compilations"] and not cold:
        err = NothingCompiledError(
            f"the warm start compiled {result['fresh_compilations']} graph(s) (FX-graph cache misses) for "
            f"{shape['width']}x{shape['height']} batch {shape['batch_size']}; the cache does not cover this "
            "config/shape or was built with another torch. Warm this shape (--resolutions/--batch-sizes)")
        err.result = result
        raise err
    return result


def _run_child(payload: dict, timeout, entry, cold: bool, shape: dict) -> dict:
    payload = {**payload, "spawned_at": time.time()}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sd3plugin.apps.verify", json.dumps(payload)],
                              capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        raise CacheError(f"the verify process did not finish within --timeout {timeout:g} s") from None
    wall = time.perf_counter() - t0
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise child_failure(proc)
    result = json.loads(line[len(MARK):])
    result["process_seconds"] = round(wall, 3)
    result.setdefault("startup", {})["imports"] = parse_importtime(proc.stderr or "")
    result["fingerprint"] = entry["fingerprint"] if entry else None
    result["cold"] = cold
    result["ok"] = (cold or result["fresh_compilations"] == 0) and result["status"] == "compiled"
    if result["status"] != "compiled":
        raise CacheError(f"the pipeline was not compiled in the verify process (status {result['status']}: "
                         f"{result.get('error')})")
    return result


def child_failure(proc) -> Exception:
    """One line for a verify process that ended without a result: the ConfigError it reported (a model or
    config mistake: exit code 2, as in run and warm), or a CacheError with its last error line. Its traceback
    is shown only with SD3PLUGIN_DEBUG=1."""
    from ..errors import ConfigError

    err = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(ERROR_MARK)), None)
    if os.environ.get("SD3PLUGIN_DEBUG") and proc.stderr:
        sys.stderr.write(proc.stderr)
    if err is not None:
        info = json.loads(err[len(ERROR_MARK):])
        if info.get("config_error"):
            return ConfigError(info["message"])
        return CacheError(f"the verify process failed: {info['message']} (SD3PLUGIN_DEBUG=1 shows its traceback)")
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines()
             if ln.strip() and not ln.startswith("import time:")]  # -X importtime's lines say nothing here
    last = lines[-1][:300] if lines else "no output"
    return CacheError(f"the verify process failed (exit {proc.returncode}): {last} (SD3PLUGIN_DEBUG=1 shows its "
                      "output)")


def _child(payload: dict) -> dict:
    import sd3plugin

    from ..config import compose
    from ..config.resolve import resolve_device
    from ..pipeline import call_kwargs, load_pipeline, model_path, synchronize
    from ..cache.megacache import compile_counters

    import diffusers  # noqa: F401  (imports are part of the warm start: counted in import_seconds)
    from diffusers import StableDiffusion3Pipeline  # noqa: F401

    imported = time.perf_counter()
    cfg = compose(None, payload["overrides"])
    cfg.cache_dir = payload["cache_dir"]
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    folder = model_path(cfg)  # random-weight presets are built once; not part of the warm start
    build = time.perf_counter() - t0
    shape = payload["shape"]
    cold_dir = tempfile.mkdtemp(prefix="sd3plugin-cold-") if payload.get("cold") else None
    if cold_dir:  # compile from scratch: an empty cache_dir (inductor, Triton, FA4), same model folder
        cfg.model, cfg.cache_dir = str(folder), cold_dir
    profile_path = os.environ.get("SD3PLUGIN_VERIFY_PROFILE")  # where the time of a warm start goes
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with sd3plugin.enabled(cfg):
        t1 = time.perf_counter()
        pipe = load_pipeline(cfg)
        loaded = time.perf_counter()
        inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
        before = compile_counters(inductor_dir)
        t2 = time.perf_counter()
        kwargs = call_kwargs(cfg, height=shape["height"], width=shape["width"], steps=payload.get("steps"),
                             output_type="pil")
        kwargs["num_images_per_prompt"] = shape["batch_size"]
        if not shape.get("guidance", True):
            kwargs["guidance_scale"] = 1.0
        pipe.set_progress_bar_config(disable=True)
        images = pipe(**kwargs).images
        synchronize(device)
        t3 = time.perf_counter()
        steady = None
        if payload.get("steady"):  # the image itself, after the start: what the first one is compared with
            kwargs["generator"] = call_kwargs(cfg)["generator"]
            s = time.perf_counter()
            pipe(**kwargs)
            synchronize(device)
            steady = round(time.perf_counter() - s, 3)
        rep = sd3plugin.report(pipe)
        after = compile_counters(inductor_dir)
    if profile_path:
        profiler.disable()
        _write_profile(profiler, profile_path)
    # Nothing compiled before the first call; a new nexfort compiled-graph entry is a nexfort compile.
    new_graphs = after.pop("nexfort_graph_entries") - before["nexfort_graph_entries"]
    counters = {**after, "nexfort_graph_cache_new": new_graphs,
                "fresh_compilations": after["fresh_compilations"] + new_graphs}
    if cold_dir:
        shutil.rmtree(cold_dir, ignore_errors=True)
    startup = rep.get("startup", {})
    interpreter = _WALL_START - payload["spawned_at"] if payload.get("spawned_at") else 0.0
    marks = {"start": _T_START, "imported": imported, "configured": t0, "built": t0 + build, "hooked": t1,
             "loaded": loaded, "counted": t2, "imaged": t3}
    startup["phases"], startup["other_seconds"] = phases(startup, marks, interpreter)
    first = startup.get("first_call") or {}
    return {"time_to_first_image_seconds": round(t3 - _T_START - build, 3),
            "process_to_first_image_seconds": round(interpreter + t3 - _T_START - build, 3),
            "import_seconds": round(imported - _T_START, 3), "load_seconds": round(t2 - t1, 3),
            "first_image_seconds": round(t3 - t2, 3), "steady_image_seconds": steady,
            "model_build_seconds": round(build, 3),
            "phases": startup["phases"], "other_seconds": startup["other_seconds"],
            "autotuned_kernels": first.get("autotuned_kernels", 0),
            "coordesc_benchmarks": first.get("coordesc_benchmarks", 0),
            "images": len(images), "shape": shape, "steps": kwargs["num_inference_steps"],
            "status": rep.get("status"), "error": rep.get("error"), "backend": rep.get("backend"),
            "mode": rep.get("mode", {}).get("spec"), "cache": rep.get("cache"),
            "keep_coordesc": rep.get("keep_coordesc", False), "attention": rep.get("attention"),
            "precompiled": rep.get("precompiled"), "startup": startup, **counters}


def phases(startup: dict, m: dict, interpreter: float) -> tuple[dict, float]:
    """Every second from process start to the first image, named; the rest is ``other`` (returned apart).

    ``m`` holds the child's ``perf_counter`` marks; the hook, ``optimize`` and the first-image timer fill
    ``startup`` (``load``, ``setup_seconds``, ``first_image``)."""
    load = startup.get("load") or {}
    comps = load.get("components") or {}
    image = startup.get("first_image") or {}
    named = {"interpreter_seconds": interpreter, "imports_seconds": m["imported"] - m["start"],
             "config_seconds": m["configured"] - m["imported"], "hook_seconds": m["hooked"] - m["built"]}
    named.update({f"load_{k}_seconds": v for k, v in comps.items()})
    from_pretrained = load.get("seconds") or 0.0
    named["from_pretrained_other_seconds"] = max(from_pretrained - sum(comps.values()), 0.0)
    named["optimize_seconds"] = startup.get("setup_seconds") or 0.0
    named["to_device_seconds"] = load.get("to_device_seconds") or 0.0
    named["load_pipeline_other_seconds"] = max((m["loaded"] - m["hooked"]) - from_pretrained
                                               - named["optimize_seconds"] - named["to_device_seconds"], 0.0)
    named["compile_counters_seconds"] = m["counted"] - m["loaded"]
    for k in ("text_encoding_seconds", "denoising_seconds", "vae_seconds"):
        named[k] = image.get(k, 0.0)
    named["first_image_other_seconds"] = max((m["imaged"] - m["counted"]) - sum(image.values()), 0.0)
    total = interpreter + (m["imaged"] - m["start"]) - (m["built"] - m["configured"])
    return {k: round(v, 3) for k, v in named.items()}, round(total - sum(named.values()), 3)


def _write_profile(profiler, path: str) -> None:
    """Load + first image: the 60 most expensive calls by cumulative and by own time, as text."""
    import io
    import pstats

    buf = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(60)
    Path(path).write_text(buf.getvalue())


def _child_main(argv: list[str]) -> int:
    """The verify process: its result on one line of stdout, or its error on one line (never a traceback,
    unless SD3PLUGIN_DEBUG=1)."""
    from ..errors import ConfigError

    try:
        out = _child(json.loads(argv[0]))
    except Exception as exc:  # reported to the parent in one line; it decides the exit code
        if os.environ.get("SD3PLUGIN_DEBUG"):
            import traceback

            traceback.print_exc()
        text = (str(exc).strip().splitlines() or [""])[0][:500]
        config = isinstance(exc, ConfigError)
        print(ERROR_MARK + json.dumps({"config_error": config,
                                       "message": text if config else f"{type(exc).__name__}: {text}"}), flush=True)
        return 2 if config else 1
    print(MARK + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
