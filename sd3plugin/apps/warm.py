"""``warm``: compile what a configured pipeline needs for a list of shapes and store it as a cache entry:
the Mega-Cache blob of the inductor artefacts and, where torch can (``compat/precompile.py``), the
precompiled transformer blocks (``backends/precompiled.py``) for the block inputs of those calls.

Compiled graphs depend on shapes, dtypes and the config, not on weight values, so the random-weight
presets (``model=sd3-medium``) warm caches for the real models without downloading them. The one mode
token that breaks this is ``freezing`` (weights become constants in the graph): warm refuses it.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..config import parse_mode
from ..errors import ConfigError
from ..backends import precompiled
from ..cache import megacache, store
from ..cache import precompiled as precompiled_store
from ..cache.errors import CacheError
from ..cache.lock import DEFAULT_TIMEOUT_S, cache_lock
from ..cache.manifest import compile_config, environment, fingerprint
from ..cache.megacache import compile_counters, compiled_between, save_artifacts

log = logging.getLogger("sd3plugin")


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,768x1344"`` -> [(1024, 1024), (768, 1344)] as (width, height); ``"512"`` = 512x512."""
    out = []
    for item in (text or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        w, sep, h = item.partition("x")
        try:
            wh = (int(w), int(h if sep else w))
        except ValueError:
            raise ConfigError(f"--resolutions item {item!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
        if min(wh) < 1:
            raise ConfigError(f"--resolutions item {item!r} must be positive")
        if wh not in out:
            out.append(wh)
    return out


def parse_batch_sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes {text!r} is not a comma-separated list of integers (e.g. 1,2)") from None
    if any(b < 1 for b in out):
        raise ConfigError(f"--batch-sizes {text!r}: every batch size must be at least 1")
    return list(dict.fromkeys(out))


def plan_shapes(cfg, resolutions: list[tuple[int, int]], batch_sizes: list[int]) -> list[dict]:
    """Every (resolution, batch size) to warm, checked against the model's resolution rule."""
    from ..models import check_resolution
    from ..pipeline import resolution

    if not resolutions:
        h, w = resolution(cfg)
        resolutions = [(w, h)]
    batch_sizes = batch_sizes or [int(cfg.num_images)]
    guidance = float(cfg.guidance_scale) > 1.0
    shapes = []
    for w, h in resolutions:
        check_resolution(cfg.model, h, w)
        for b in batch_sizes:
            shapes.append({"width": w, "height": h, "batch_size": b, "guidance": guidance})
    return shapes


def check_warmable(cfg) -> None:
    tokens = parse_mode(cfg.mode.spec)
    if "freezing" in tokens:
        raise ConfigError(
            f"mode.spec={cfg.mode.spec!r} contains 'freezing': inductor folds the weights into the compiled "
            "graphs as constants, so the artefacts depend on weight values and PyTorch does not cache them "
            "(FX-graph cache bypass). A shippable cache cannot be warmed for it; drop the token (e.g. "
            "mode.spec=max-optimize:max-autotune:low-precision:cudagraphs:benchmark) or use mode=max-speed")
    if cfg.backend == "eager":
        raise ConfigError("backend=eager compiles nothing, so there is nothing to warm; use backend=auto "
                          "or backend=inductor")


def warm(cfg, shapes: list[dict], steps: int = 2, lock_timeout: float = DEFAULT_TIMEOUT_S,
         progress: bool = True) -> dict:
    """Compile ``cfg``'s pipeline for ``shapes`` (one short call each) and store the Mega-Cache entry.

    Holds the cache dir's lock throughout: a concurrent warm waits, then reuses what this one compiled.
    """
    check_warmable(cfg)
    root = Path(cfg.cache_dir).expanduser()
    fp = fingerprint(cfg)
    started = time.perf_counter()
    with cache_lock(root, lock_timeout, "warm"):
        waited = time.perf_counter() - started
        per_shape, rep, saved, blocks = _compile_shapes(cfg, shapes, steps, progress)
        # Without Mega-Cache (torch < 2.7: the nexfort stack) the inductor folder alone is the cache.
        if saved is None and megacache.available():
            raise CacheError(f"nothing was compiled for {cfg.model} (backend {rep.get('backend')}: "
                             f"{rep.get('backend_reason')}); nothing to store")
        blob, counts = saved if saved is not None else (None, {})
        env = environment()
        path = store.add_blob(root, fp, compile_config(cfg), OmegaConf.to_container(cfg, resolve=True),
                              env, shapes, blob, counts, per_shape)
        pre = _store_precompiled(root, fp, blocks, env)
        store.refresh_checksums(root)  # the precompiled files and the entry.json they updated
    return {"ok": True, "cache_dir": str(root), "fingerprint": fp, "entry": str(path.parent),
            "blob": path.name if blob is not None else None, "blob_bytes": len(blob or b""), "artifacts": counts, "shapes": per_shape,
            "lock_wait_seconds": round(waited, 3), "seconds": round(time.perf_counter() - started, 3),
            "backend": rep.get("backend"), "mode": rep.get("mode", {}).get("spec"),
            "cache": rep.get("cache"), "precompiled": pre}


def _store_precompiled(root: Path, fp: str, blocks: dict, env: dict) -> dict:
    """Write the blocks precompiled by this run beside the still valid ones of earlier runs (other shapes).
    Artefacts of the keys this run precompiled are replaced; damaged ones and those of another environment
    are dropped (``cache.precompiled.usable``): a warm rebuilds what a server could not use."""
    out = {k: v for k, v in blocks.items() if k not in ("artefacts", "sampled_keys")}
    if blocks.get("reason"):  # nothing to build (torch without precompile, backend...)
        return out
    new = blocks["artefacts"]
    valid, dropped, _ = precompiled_store.usable(root, fp, env)
    sampled = set(blocks["sampled_keys"])
    keep = [record for record, _ in valid if record.get("key") not in sampled]
    index = precompiled_store.write(root, fp, new, keep, env)
    out.update(built=len(new), kept=len(keep), dropped=[d["file"] for d in dropped],
               artefacts=len(index["artefacts"]), size_bytes=sum(r["size"] for r in index["artefacts"]))
    return out


def _compile_shapes(cfg, shapes, steps, progress):
    from tqdm import tqdm

    import sd3plugin

    from ..config.resolve import resolve_device
    from ..pipeline import call_kwargs, load_pipeline, synchronize

    device = resolve_device(cfg.device)
    inductor_dir = Path(cfg.cache_dir).expanduser() / store.INDUCTOR
    per_shape = []
    with sd3plugin.enabled(cfg), precompiled.recording() as samples:  # cache dirs and flags stay set
        pipe = load_pipeline(cfg)
        rep = sd3plugin.report(pipe)
        if rep.get("status") != "compiled":
            raise CacheError(f"the pipeline was not compiled (backend {rep.get('backend')}, status "
                             f"{rep.get('status')}: {rep.get('error') or rep.get('backend_reason')}); "
                             "nothing to warm")
        pipe.set_progress_bar_config(disable=True)
        for shape in shapes:
            label = f"warm {shape['width']}x{shape['height']} batch {shape['batch_size']}"
            bar = tqdm(total=steps, desc=label, unit="step", disable=not progress, file=sys.stderr)

            def on_step(p, i, t, kw, bar=bar):
                bar.update(1)
                return kw

            kwargs = call_kwargs(cfg, height=shape["height"], width=shape["width"], steps=steps,
                                 output_type="pil")
            kwargs["num_images_per_prompt"] = shape["batch_size"]
            before = compile_counters(inductor_dir)
            t0 = time.perf_counter()
            try:
                pipe(**kwargs, callback_on_step_end=on_step)
                synchronize(device)
            finally:
                bar.close()
            after = compile_counters(inductor_dir)
            per_shape.append({**shape, "seconds": round(time.perf_counter() - t0, 3),
                              "fresh_compilations": compiled_between(before, after),
                              "fxgraph_cache_hit": after["fxgraph_cache_hit"] - before["fxgraph_cache_hit"]})
        rep = sd3plugin.report(pipe)
        if rep.get("status") != "compiled":
            raise CacheError(f"compilation failed at the first call ({rep.get('error')}); the pipeline ran "
                             "eagerly, so nothing was cached. Fix the config (see sd3plugin-run) and warm again")
        blocks = _precompile_blocks(rep, samples)
        saved = save_artifacts()
    return per_shape, rep, saved, blocks


def _precompile_blocks(rep: dict, samples: list) -> dict:
    """Precompile the transformer blocks for the inputs recorded while warming (backends/precompiled.py)."""
    from ..compat import precompile

    if rep.get("backend") != "inductor":
        return {"reason": f"backend={rep.get('backend')} has no precompiled blocks"}
    ok, why = precompile.support()
    if not ok:
        return {"reason": why}
    if not samples:
        return {"reason": "no transformer block was called"}
    started = time.perf_counter()
    built, errors = precompiled.build(samples, rep.get("inductor_options") or {}, bool(rep.get("dynamic")), set())
    for err in errors:
        log.warning("sd3plugin: could not precompile a transformer block: %s", err)
    return {"artefacts": built, "sampled_keys": [s["key"] for s in samples], "errors": errors,
            "api": precompile.api(), "seconds": round(time.perf_counter() - started, 3)}
