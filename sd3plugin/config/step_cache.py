"""The ``step_cache`` presets (one table) and the pure checks of the ``step_cache`` keys (docs/step-cache.md).

Step caching reuses the transformer's work across denoising steps through cache-dit 1.5
(``pip install "sd3plugin[cache]"``): DBCache computes the first ``fn`` and last ``bn`` blocks at every step
and, while the residual of the first ``fn`` blocks changes by less than ``threshold`` from the last computed
step, reuses the middle blocks' residual instead of running them. ``warmup`` steps are always computed,
``max_cached`` caps the reused steps (-1: no cap), ``max_continuous`` the reused steps in a row, and
TaylorSeer (``taylorseer_order`` > 0) extrapolates the reused residual instead of repeating it. The caching
decisions are cache-dit's; this module only names them.

Everything here is pure (no torch, no cache-dit): composing ``step_cache=dbcache`` works without the extra;
whether cache-dit is installed is checked when a plan is made (``check_step_cache_runnable``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError

KNOBS = ("fn", "bn", "threshold", "warmup", "max_cached", "max_continuous", "taylorseer_order")
INSTALL_HINT = 'pip install "sd3plugin[cache]" (cache-dit 1.5.3)'


@dataclass(frozen=True)
class StepCachePreset:
    name: str
    description: str
    fn: int = 8
    bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    max_cached: int = -1
    max_continuous: int = -1
    taylorseer_order: int = 0

    def knobs(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in KNOBS}


STEP_CACHE_PRESETS: dict[str, StepCachePreset] = {p.name: p for p in (
    StepCachePreset("none", "every step computes every block (exact)", threshold=0.0),
    StepCachePreset("dbcache", "cache-dit's DBCache defaults: F8B0, threshold 0.08, 8 warm-up steps"),
    StepCachePreset("dbcache_fast", "DBCache F4B0, threshold 0.12, 4 warm-up steps, at most 3 reused steps in "
                    "a row: more reuse, more drift", fn=4, threshold=0.12, warmup=4, max_continuous=3),
    StepCachePreset("fbcache", "First-Block Cache (DBCache F1B0): the first block decides, threshold 0.08",
                    fn=1, warmup=8),
    StepCachePreset("taylorseer", "DBCache F1B1 with a first-order TaylorSeer forecast of the reused residual, "
                    "threshold 0.12", fn=1, bn=1, threshold=0.12, warmup=4, taylorseer_order=1),
)}


def preset_node(name: str) -> dict:
    """The keys preset ``name`` sets (the generated ``step_cache`` group)."""
    return {"name": name, **STEP_CACHE_PRESETS[name].knobs()}


def is_on(scfg) -> bool:
    return scfg is not None and str(scfg.name) != "none"


def label(scfg) -> str:
    """How messages name the setting: ``step_cache=dbcache`` (with the keys changed from the preset)."""
    name = str(scfg.name)
    preset = STEP_CACHE_PRESETS.get(name)
    changed = [f"step_cache.{k}={scfg[k]}" for k in KNOBS if preset is None or scfg[k] != getattr(preset, k)]
    return " ".join([f"step_cache={name}", *changed])


def fingerprint_component(cfg) -> dict | None:
    """The step-cache part of the cache fingerprint: None with ``step_cache=none`` (fingerprints stay as
    they were before the group existed), else the preset's name and every knob."""
    scfg = cfg.get("step_cache") if hasattr(cfg, "get") else getattr(cfg, "step_cache", None)
    if not is_on(scfg):
        return None
    return {"name": str(scfg.name), **{k: scfg[k] for k in KNOBS}}


def check_step_cache_config(cfg) -> None:
    """Pure checks: a known name, knobs in range, and the settings the plugin cannot combine with a step
    cache (each refusal names the conflict and the fix)."""
    scfg = cfg.get("step_cache")
    if scfg is None:
        return
    name = str(scfg.name)
    if name not in STEP_CACHE_PRESETS:
        raise ConfigError(f"step_cache={name!r} is not a step-cache preset; valid presets: "
                          f"{', '.join(STEP_CACHE_PRESETS)}")
    if name == "none":
        return
    if int(scfg.fn) < 1:
        raise ConfigError(f"step_cache.fn={scfg.fn} must be at least 1: cache-dit decides from the residual of "
                          "the first fn blocks")
    if int(scfg.bn) < 0:
        raise ConfigError(f"step_cache.bn={scfg.bn} must be 0 or more (blocks always computed at the end)")
    if float(scfg.threshold) < 0:
        raise ConfigError(f"step_cache.threshold={scfg.threshold} must be 0 or more (0 reuses nothing)")
    if int(scfg.warmup) < 0:
        raise ConfigError(f"step_cache.warmup={scfg.warmup} must be 0 or more (steps always computed first)")
    for key in ("max_cached", "max_continuous"):
        if int(scfg[key]) < -1 or int(scfg[key]) == 0:
            raise ConfigError(f"step_cache.{key}={scfg[key]} must be -1 (no limit) or at least 1; "
                              "use step_cache=none to reuse nothing")
    order = int(scfg.taylorseer_order)
    if order < 0 or order > 4:
        raise ConfigError(f"step_cache.taylorseer_order={order} must be 0 (off) to 4")
    if order > 0 and int(scfg.bn) < 1:
        raise ConfigError(f"step_cache.taylorseer_order={order} needs step_cache.bn >= 1 (cache-dit 1.5.3's "
                          "TaylorSeer forecasts the back blocks' residual); set step_cache.bn=1 or "
                          "step_cache.taylorseer_order=0")
    check_conflicts(cfg)


def check_conflicts(cfg) -> None:
    """What a step cache cannot run with, known from the config alone."""
    from .modes import parse_mode

    what = label(cfg.step_cache)
    if "cudagraphs" in parse_mode(cfg.mode.spec) or bool(cfg.backend_options.get("triton.cudagraphs", False)):
        raise ConfigError(f"{what} cannot run with CUDA graphs (mode={cfg.mode.name}: token 'cudagraphs'): a "
                          "graph replays the same blocks at every step, while cache-dit decides at each step "
                          "which blocks to run; use mode=default (or drop 'cudagraphs' from mode.spec), or "
                          "step_cache=none")
    pcfg = cfg.get("parallel")
    if pcfg is not None:
        from .parallel import is_parallel

        if is_parallel(cfg):
            raise ConfigError(f"{what} is not wired into the xDiT path (parallel={pcfg.name}); use "
                              "parallel=none with a step cache, or step_cache=none with parallel")


def check_step_cache_installed(scfg) -> None:
    """A step cache needs cache-dit installed (the ``cache`` extra)."""
    if not is_on(scfg):
        return
    from importlib.util import find_spec

    if find_spec("cache_dit") is None:
        raise ConfigError(f"{label(scfg)} needs cache-dit, which is not installed; {INSTALL_HINT}, or use "
                          "step_cache=none")


def check_blocks(scfg, num_blocks: int) -> tuple[int, int]:
    """(fn, bn) for a transformer of ``num_blocks`` blocks: ``fn`` is lowered so that at least one middle
    block is left to reuse; a ConfigError when even ``fn=1`` leaves none."""
    fn, bn = int(scfg.fn), int(scfg.bn)
    room = num_blocks - bn - 1
    if room < 1:
        raise ConfigError(f"{label(scfg)}: this transformer has {num_blocks} blocks, too few for "
                          f"step_cache.bn={bn} plus at least one first block and one block to reuse; lower "
                          "step_cache.bn or use step_cache=none")
    return min(fn, room), bn
