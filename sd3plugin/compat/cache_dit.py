"""cache-dit calls sd3plugin relies on (written against cache-dit 1.5.3): switch step caching on a
diffusers pipeline on and off, and read how many block computations it reused.

What cache-dit changes, and how ``disable`` gives it back:
- it wraps ``pipe.__class__.__call__`` (the class, so every pipeline of that class): ``enable`` first gives
  the pipeline a subclass of its own (same name), so other pipelines are never touched, and ``disable``
  puts the original class back;
- it replaces ``transformer.forward`` with a function that swaps ``transformer_blocks`` for its cached
  blocks during the call and calls the forward that was there before (sd3plugin's compile guard, when
  compiled); cache-dit's own release rebinds that forward as a method, which a guard object is not, so
  ``disable`` puts the instance attribute back itself;
- it calls each block as a module (``block(...)``), so compiled and precompiled blocks still run.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

STATE_ATTR = "_sd3plugin_step_cache"


@dataclass(frozen=True)
class StepCacheSettings:
    """One cache-dit strategy. ``fn``/``bn``: blocks always computed at the front/back; ``threshold``:
    residual difference under which the middle blocks are reused; ``warmup``: steps always computed first;
    ``max_cached``: most steps reused (-1: no limit); ``max_continuous``: most steps reused in a row (-1: no
    limit); ``taylorseer_order``: 0 disables TaylorSeer."""

    fn: int = 8
    bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    max_cached: int = -1
    taylorseer_order: int = 0
    max_continuous: int = -1

    def as_dict(self) -> dict:
        return asdict(self)


def available() -> bool:
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        from importlib.metadata import version as v

        return v("cache-dit")
    except Exception:
        return None


def _quiet() -> None:
    """cache-dit logs every context it creates at INFO; keep its warnings and errors."""
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)


def enable(pipe: Any, s: StepCacheSettings) -> None:
    """Turn cache-dit's DBCache (with TaylorSeer when ``s.taylorseer_order`` > 0) on for ``pipe``."""
    import cache_dit

    if s.taylorseer_order > 0 and s.bn < 1:
        # cache-dit 1.5.3's TaylorSeer reads the back blocks' residual, which Bn=0 never stores
        raise ValueError("TaylorSeer needs bn >= 1 (cache-dit 1.5.3 fails with Bn=0): set bn to 1 or more")
    if STATE_ATTR in pipe.__dict__:
        raise ValueError("step caching is already on for this pipeline: disable it first")
    _quiet()
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=s.fn, Bn_compute_blocks=s.bn, residual_diff_threshold=s.threshold,
        max_warmup_steps=s.warmup, max_cached_steps=s.max_cached, max_continuous_cached_steps=s.max_continuous)
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=s.taylorseer_order)
                  if s.taylorseer_order > 0 else None)
    base = type(pipe)
    transformer = pipe.transformer
    state = {"class": base, "forward": transformer.__dict__.get("forward")}
    pipe.__class__ = type(base.__name__, (base,), {"__module__": base.__module__, "__qualname__": base.__qualname__})
    pipe.__dict__[STATE_ATTR] = state
    try:
        cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    except BaseException:
        disable(pipe)
        raise


def is_enabled(pipe: Any) -> bool:
    return STATE_ATTR in getattr(pipe, "__dict__", {})


def disable(pipe: Any) -> None:
    """Remove cache-dit from ``pipe``: its class, the transformer's forward and cache-dit's attributes."""
    import cache_dit

    state = pipe.__dict__.pop(STATE_ATTR, None)
    transformer = getattr(pipe, "transformer", None)
    if state is not None and transformer is not None:
        transformer.__dict__.pop("forward", None)
        transformer.__dict__.pop("_original_forward", None)
        if state["forward"] is not None:
            transformer.__dict__["forward"] = state["forward"]
    cache_dit.disable_cache(pipe)
    if state is not None:
        pipe.__class__ = state["class"]


def last_call(pipe: Any) -> dict:
    """The last pipeline call as cache-dit counts it: ``steps`` (transformer calls) and ``cached_steps``
    (the steps whose middle blocks were reused); empty before the first call."""
    import cache_dit

    if getattr(pipe, "transformer", None) is None:
        return {}
    steps, cached = 0, set()
    for stats in cache_dit.summary(pipe, logging=False):
        cached.update(getattr(stats, "cached_steps", None) or [])
        steps = max(steps, int(getattr(stats, "accumulated_executed_steps", 0) or 0))
    return {"steps": steps, "cached_steps": sorted(cached)} if steps else {}


def cached_steps(pipe: Any) -> list[int]:
    """Steps of the last call whose middle blocks were reused, as cache-dit counts them."""
    return last_call(pipe).get("cached_steps", [])
