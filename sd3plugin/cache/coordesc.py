"""Experimental: keep coordinate-descent tuning results across processes (``SD3PLUGIN_KEEP_COORDESC=1``).

What it works around (torch 2.11, read from its source and seen in scripts/warm_start_trace.py on the
H100): Triton kernels that come back from the FX-graph cache are rebuilt by
``CachingAutotuner.recheck_autotune_cache``, which applies a cached best config only when the kernel has
several candidate configs. A kernel with one config whose cached best config was found by
coordinate-descent tuning (the ``max-optimize`` token) keeps its untuned config, so the first call of every
new process tunes it again: about 6.5 s of SD3-medium's 13.7 s warm first image.

``install()`` wraps that method: after torch's own check, a single-config kernel whose cache entry was
found by coordinate descent is compiled with that config (marked ``found_by_coordesc``), so it is not
tuned again. Recorded in GLOBAL_SETTINGS, so ``sd3plugin.disable()`` restores torch's method.
Not on by default: its effect has not been measured on a GPU yet (docs/benchmarks/README.md).
"""
from __future__ import annotations

import functools
import os

from ..global_settings import GLOBAL_SETTINGS

ENV = "SD3PLUGIN_KEEP_COORDESC"
TARGET = "torch._inductor.runtime.triton_heuristics:CachingAutotuner.recheck_autotune_cache"


def apply_cached_coordesc(autotuner, reload_kernel_from_src, check_autotune_cache) -> bool:
    """Give ``autotuner`` its cached coordinate-descent config where torch left it out; True if it did."""
    results = getattr(autotuner, "compile_results", None) or []
    if len(results) != 1 or getattr(results[0].config, "found_by_coordesc", False):
        return False
    if not autotuner.inductor_meta.get("coordinate_descent_tuning"):
        return False
    cached, _, _ = check_autotune_cache([results[0].config], autotuner.filename, autotuner.inductor_meta)
    if len(cached) != 1 or not getattr(cached[0], "found_by_coordesc", False):
        return False
    if autotuner.fn.fn is None:  # compiled in a worker: the parent reloads the kernel source first
        autotuner.fn = reload_kernel_from_src().fn
    autotuner.compile_results = [autotuner._precompile_config(cached[0])]
    return True


def _wrap(original):
    from torch._inductor.runtime.triton_heuristics import check_autotune_cache

    @functools.wraps(original)
    def recheck_autotune_cache(self, reload_kernel_from_src):
        original(self, reload_kernel_from_src)
        apply_cached_coordesc(self, reload_kernel_from_src, check_autotune_cache)

    recheck_autotune_cache.sd3plugin_original = original
    return recheck_autotune_cache


def install(force: bool = False) -> bool:
    """Wrap torch's method when ``SD3PLUGIN_KEEP_COORDESC=1`` (or ``force``); False where torch lacks it."""
    if not (force or os.environ.get(ENV) == "1"):
        return False
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return False
    current = getattr(CachingAutotuner, "recheck_autotune_cache", None)
    if current is None or hasattr(current, "sd3plugin_original"):
        return current is not None
    GLOBAL_SETTINGS.set_flag(TARGET, _wrap(current))
    return True
