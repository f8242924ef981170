"""cache-dit calls sd3plugin relies on (written against cache-dit 1.5.3): switch step caching on a
diffusers pipeline on and off, and read how many block computations it reused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepCacheSettings:
    """One cache-dit strategy. ``fn``/``bn``: blocks always computed at the front/back; ``threshold``:
    residual difference under which the middle blocks are reused; ``warmup``: steps always computed first;
    ``max_cached``: most steps reused (-1: no limit); ``taylorseer_order``: 0 disables TaylorSeer."""

    fn: int = 8
    bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    max_cached: int = -1
    taylorseer_order: int = 0


def available() -> bool:
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def enable(pipe: Any, s: StepCacheSettings) -> None:
    """Turn cache-dit's DBCache (with TaylorSeer when ``s.taylorseer_order`` > 0) on for ``pipe``."""
    import cache_dit

    if s.taylorseer_order > 0 and s.bn < 1:
        # cache-dit 1.5.3's TaylorSeer reads the back blocks' residual, which Bn=0 never stores
        raise ValueError("TaylorSeer needs bn >= 1 (cache-dit 1.5.3 fails with Bn=0): set bn to 1 or more")
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=s.fn, Bn_compute_blocks=s.bn, residual_diff_threshold=s.threshold,
        max_warmup_steps=s.warmup, max_cached_steps=s.max_cached)
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=s.taylorseer_order)
                  if s.taylorseer_order > 0 else None)
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)


def disable(pipe: Any) -> None:
    import cache_dit

    cache_dit.disable_cache(pipe)


def cached_steps(pipe: Any) -> list[int]:
    """Steps of the last call whose middle blocks were reused, as cache-dit counts them."""
    import cache_dit

    steps: list[int] = []
    for stats in cache_dit.summary(pipe, logging=False):
        steps.extend(getattr(stats, "cached_steps", None) or [])
    return sorted(set(steps))
