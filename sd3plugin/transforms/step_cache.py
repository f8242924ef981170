"""Step caching through cache-dit (``step_cache=...``, docs/step-cache.md): reuse the middle transformer
blocks' work across denoising steps. Applied after compilation, so cache-dit's forward wraps the compile
guard and calls the compiled (or precompiled) blocks one by one; every caching decision is cache-dit's
(``sd3plugin.compat.cache_dit``). The handle takes cache-dit off the pipeline again.

Refused with a ConfigError naming the fix: the transformer alone (cache-dit caches across a pipeline's
denoising loop), CUDA graphs of the whole step (they replay every block), group offloading (cache-dit
does not support it), too few blocks for the configured ``bn``.
"""
from __future__ import annotations

import logging
import weakref

from ..backends import cudagraph
from ..compat import cache_dit as seam
from ..compat import diffusers as dcompat
from ..config.step_cache import check_blocks, check_step_cache_installed, is_on, label
from ..errors import ConfigError
from .base import Handle, Run

log = logging.getLogger("sd3plugin")
NAME = "step_cache"
PIPE_ATTR = "_sd3plugin_step_cache_pipe"


def _refuse_conflicts(run: Run, what: str) -> None:
    t = run.transformer
    if run.target is t:
        raise ConfigError(f"{what} needs the pipeline: cache-dit caches across its denoising loop; call "
                          "sd3plugin.optimize(pipe) on the pipeline (or load it with the hook on), or use "
                          "step_cache=none for the transformer alone")
    if cudagraph.runner_of(t) is not None:
        raise ConfigError(f"{what} cannot run with CUDA graphs of the whole step: a graph replays every block, "
                          "while cache-dit decides at each step which blocks to run; drop 'cudagraphs' from "
                          "mode.spec (mode=default) or use step_cache=none")
    if dcompat.group_offloaded(t):
        raise ConfigError(f"{what} cannot run with group offloading (cache-dit 1.5 does not support it); use "
                          "pipe.enable_model_cpu_offload() instead, or step_cache=none")


def apply(run: Run) -> Handle | None:
    scfg = run.plan.step_cache
    if not is_on(scfg):
        run.report["step_cache"] = {"name": "none"}
        return None
    what = label(scfg)
    check_step_cache_installed(scfg)
    _refuse_conflicts(run, what)
    t, pipe = run.transformer, run.target
    blocks = len(t.transformer_blocks)
    fn, bn = check_blocks(scfg, blocks)
    settings = seam.StepCacheSettings(
        fn=fn, bn=bn, threshold=float(scfg.threshold), warmup=int(scfg.warmup), max_cached=int(scfg.max_cached),
        taylorseer_order=int(scfg.taylorseer_order), max_continuous=int(scfg.max_continuous))
    if fn != int(scfg.fn):
        log.warning("sd3plugin: %s: step_cache.fn=%s lowered to %s for this transformer's %s blocks",
                    what, scfg.fn, fn, blocks)
    seam.enable(pipe, settings)
    setattr(t, PIPE_ATTR, weakref.ref(pipe))
    run.report["step_cache"] = {
        "name": str(scfg.name), "settings": settings.as_dict(), "blocks": blocks,
        "reusable_blocks": blocks - fn - bn, "cache_dit": seam.version(), "last_call": None}

    def undo():
        t.__dict__.pop(PIPE_ATTR, None)
        seam.disable(pipe)
    return Handle(NAME, undo, {})


def last_call(transformer, report: dict) -> dict | None:
    """The last pipeline call's reuse: steps, reused steps, and block computations reused per image (every
    image of one call reuses the same steps) out of those a plain run computes."""
    ref = getattr(transformer, PIPE_ATTR, None)
    pipe = ref() if ref is not None else None
    if pipe is None or not seam.is_enabled(pipe):
        return None
    stats = seam.last_call(pipe)
    if not stats:
        return None
    cached = stats["cached_steps"]
    return {"steps": stats["steps"], "cached_steps": cached,
            "reused_block_computations_per_image": len(cached) * report["reusable_blocks"],
            "block_computations_per_image": stats["steps"] * report["blocks"]}
