"""SD3PLUGIN_KEEP_COORDESC: a single-config kernel gets its cached coordinate-descent config (fakes: the
real path needs a GPU); torch's method comes back on restore."""
from __future__ import annotations

import types

import pytest

from sd3plugin.cache import coordesc
from sd3plugin.global_settings import GLOBAL_SETTINGS


class Cfg:
    def __init__(self, name, coordesc=False):
        self.name = name
        if coordesc:
            self.found_by_coordesc = True


def _autotuner(configs, meta=None):
    t = types.SimpleNamespace(compile_results=[types.SimpleNamespace(config=c) for c in configs],
                              inductor_meta={"coordinate_descent_tuning": True} if meta is None else meta,
                              filename="/cache/ab/cabc.py", fn=types.SimpleNamespace(fn=None))
    t._precompile_config = lambda cfg: types.SimpleNamespace(config=cfg)
    return t


def _check(best):
    calls = []

    def check_autotune_cache(configs, filename, meta):
        calls.append((configs, filename))
        return ([best] if best is not None else configs), None, {}
    return check_autotune_cache, calls


def test_single_config_kernel_gets_its_cached_coordesc_config():
    start, tuned = Cfg("start"), Cfg("tuned", coordesc=True)
    t = _autotuner([start])
    check, calls = _check(tuned)
    reloaded = types.SimpleNamespace(fn="kernel fn")
    assert coordesc.apply_cached_coordesc(t, lambda: reloaded, check) is True
    assert [r.config for r in t.compile_results] == [tuned] and t.fn == "kernel fn"
    assert calls == [([start], "/cache/ab/cabc.py")]


@pytest.mark.parametrize("case", ["not coordesc", "miss", "several configs", "already tuned", "no tuning"])
def test_left_alone(case):
    start = Cfg("start", coordesc=(case == "already tuned"))
    configs = [start, Cfg("other")] if case == "several configs" else [start]
    t = _autotuner(configs, meta={} if case == "no tuning" else None)
    best = None if case == "miss" else Cfg("cached", coordesc=(case != "not coordesc"))
    check, _ = _check(best)
    assert coordesc.apply_cached_coordesc(t, lambda: None, check) is False
    assert [r.config for r in t.compile_results] == configs


def test_install_only_when_asked_and_restored(monkeypatch):
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    if not hasattr(CachingAutotuner, "recheck_autotune_cache"):
        pytest.skip("this torch has no CachingAutotuner.recheck_autotune_cache (before 2.8)")
    original = CachingAutotuner.recheck_autotune_cache
    monkeypatch.delenv(coordesc.ENV, raising=False)
    assert coordesc.install() is False and CachingAutotuner.recheck_autotune_cache is original
    monkeypatch.setenv(coordesc.ENV, "1")
    try:
        assert coordesc.install() is True
        wrapped = CachingAutotuner.recheck_autotune_cache
        assert wrapped is not original and wrapped.sd3plugin_original is original
        assert coordesc.install() is True and CachingAutotuner.recheck_autotune_cache is wrapped  # once
    finally:
        GLOBAL_SETTINGS.restore()
    assert CachingAutotuner.recheck_autotune_cache is original
