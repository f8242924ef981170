"""Keep coordinate-descent tuning results across processes (on by default; ``SD3PLUGIN_KEEP_COORDESC=0`` off).

What it works around (torch 2.11, read from its source and measured with scripts/warm_start_trace.py and
``sd3plugin-cache verify`` on the H100): Triton kernels that come back from the FX-graph cache are rebuilt
by ``CachingAutotuner.recheck_autotune_cache``, which applies a cached best config only when the kernel has
several candidate configs. A kernel with one config whose cached best config was found by
coordinate-descent tuning (the ``max-optimize`` token) keeps its untuned config, so the first call of every
new process tunes it again. Measured (SD3-medium, 1024x1024, installed cache, fresh process): first image
22.9 s -> 7.4 s for ``mode=max-speed``, 18.2 s -> 10.8 s for ``mode=default``.

``install()`` wraps that method: after torch's own check, a single-config kernel whose cache entry was
found by coordinate descent is compiled with that config (marked ``found_by_coordesc``), so it is not
tuned again. A second case: the same kernel source used by both compiled graphs (blocks 0-22 and the last
block) shares one cache entry, written with the candidate-list hash of whichever copy was tuned last, so
torch's lookup misses for the other copy and tunes it again at every start (7 kernels of SD3-medium); an
entry found by coordinate descent for the same kernel source is a valid config for it, so it is used too.
Recorded in GLOBAL_SETTINGS, so ``sd3plugin.disable()`` restores torch's method.
"""
from __future__ import annotations

import functools
import logging
import os

from ..global_settings import GLOBAL_SETTINGS

log = logging.getLogger("sd3plugin")
ENV = "SD3PLUGIN_KEEP_COORDESC"
TARGET = "torch._inductor.runtime.triton_heuristics:CachingAutotuner.recheck_autotune_cache"


def cached_coordesc_config(config, check_autotune_cache, filename, inductor_meta, load_entry=None):
    """The coordinate-descent config cached for this kernel source, or None."""
    cached, cache, _ = check_autotune_cache([config], filename, inductor_meta)
    if len(cached) == 1 and getattr(cached[0], "found_by_coordesc", False):
        return cached[0]
    if cache is None or load_entry is None:
        return None
    return load_entry(cache, config, inductor_meta)  # written by the other graph's copy of this kernel


def load_entry_any_hash(cache, config, inductor_meta):
    """A coordinate-descent entry of ``cache`` whatever candidate list it was written for (torch 2.11's
    private AutotuneCache API; None where it differs)."""
    try:
        from torch._inductor.runtime.autotune_cache import _load_cached_autotuning

        raw = cache._read()
        if not raw or not raw.get("found_by_coordesc"):
            return None
        best = _load_cached_autotuning(dict(raw), raw.get("configs_hash"), [config], inductor_meta)
    except (AttributeError, ImportError, TypeError, KeyError, ValueError, OSError):
        return None
    return best if getattr(best, "found_by_coordesc", False) else None


def apply_cached_coordesc(autotuner, reload_kernel_from_src, check_autotune_cache, load_entry=None) -> bool:
    """Give ``autotuner`` its cached coordinate-descent config where torch left it out; True if it did."""
    results = getattr(autotuner, "compile_results", None) or []
    if len(results) != 1 or getattr(results[0].config, "found_by_coordesc", False):
        return False
    if not autotuner.inductor_meta.get("coordinate_descent_tuning"):
        return False
    best = cached_coordesc_config(results[0].config, check_autotune_cache, autotuner.filename,
                                  autotuner.inductor_meta, load_entry)
    if best is None:
        return False
    if autotuner.fn.fn is None:  # compiled in a worker: the parent reloads the kernel source first
        autotuner.fn = reload_kernel_from_src().fn
    autotuner.compile_results = [autotuner._precompile_config(best)]
    return True


def _wrap(original):
    from torch._inductor.runtime.triton_heuristics import check_autotune_cache

    @functools.wraps(original)
    def recheck_autotune_cache(self, reload_kernel_from_src):
        original(self, reload_kernel_from_src)
        try:
            apply_cached_coordesc(self, reload_kernel_from_src, check_autotune_cache, load_entry_any_hash)
        except Exception as exc:  # an optimization only: never let it break loading a kernel
            log.debug("sd3plugin: cached coordinate-descent config not applied to %s: %s",
                      getattr(self, "filename", "?"), exc)

    recheck_autotune_cache.sd3plugin_original = original
    return recheck_autotune_cache


def _has_recheck() -> bool:
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return False
    return hasattr(CachingAutotuner, "recheck_autotune_cache")


def state() -> str:
    """``on``, ``off`` (``SD3PLUGIN_KEEP_COORDESC=0``) or ``n/a`` (a torch without the method it fixes)."""
    if not _has_recheck():
        return "n/a"
    return "off" if os.environ.get(ENV, "1") == "0" else "on"


def install(force: bool = False) -> bool:
    """Wrap torch's method (unless ``SD3PLUGIN_KEEP_COORDESC=0`` and not ``force``); False where it is not
    installed (turned off, or a torch without the method)."""
    if not force and os.environ.get(ENV, "1") == "0":
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


def point_cache_at(inductor_dir) -> None:
    """Set TORCHINDUCTOR_CACHE_DIR (recorded in GLOBAL_SETTINGS). torch < 2.5 memoizes paths under the old
    dir (``cpp_prefix_path``): a change of dir there also clears inductor's in-memory caches, or later C++
    kernels include a header from a folder that may be gone."""
    import torch

    changed = os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(inductor_dir)
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    if changed and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        from torch._inductor.utils import clear_inductor_caches

        clear_inductor_caches()
