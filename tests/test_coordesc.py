"""Keeping coordinate-descent results (sd3plugin/compat/inductor.py, on unless SD3PLUGIN_KEEP_COORDESC=0): a
single-config kernel gets its cached coordinate-descent config, also from an entry written by the other
graph's copy of the kernel (fakes: the real path needs a GPU); torch's method comes back on restore."""
from __future__ import annotations

import types

import pytest

from sd3plugin.compat import inductor as coordesc
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


CACHE = object()  # stands for torch's AutotuneCache of the kernel's file


def _check(best):
    calls = []

    def check_autotune_cache(configs, filename, meta):
        calls.append((configs, filename))
        return ([best] if best is not None else configs), CACHE, {}
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


def test_entry_of_the_other_graphs_copy_is_used_when_torch_misses():
    """torch's lookup misses (entry written with the other copy's candidate-list hash): the entry is read."""
    start, tuned = Cfg("start"), Cfg("tuned", coordesc=True)
    t = _autotuner([start])
    check, _ = _check(None)
    seen = []

    def load_entry(cache, config, meta):
        seen.append((cache, config))
        return tuned
    assert coordesc.apply_cached_coordesc(t, lambda: types.SimpleNamespace(fn="k"), check, load_entry) is True
    assert seen == [(CACHE, start)] and [r.config for r in t.compile_results] == [tuned]
    t = _autotuner([start])
    assert coordesc.apply_cached_coordesc(t, lambda: None, check, lambda *a: None) is False
    assert [r.config for r in t.compile_results] == [start]


def test_load_entry_any_hash_reads_only_coordesc_entries(monkeypatch):
    import torch._inductor.runtime.autotune_cache as ac

    calls = []

    def fake_load(best, configs_hash, configs, meta):
        calls.append((dict(best), configs_hash, configs))
        cfg = Cfg("rebuilt")
        cfg.found_by_coordesc = best.get("found_by_coordesc", False)
        best.clear()  # torch pops keys: the cache's own dict must not be touched
        return cfg
    monkeypatch.setattr(ac, "_load_cached_autotuning", fake_load)
    entry = {"XBLOCK": 128, "num_warps": 4, "num_stages": 1, "configs_hash": "other", "found_by_coordesc": True}
    cache = types.SimpleNamespace(_read=lambda: entry)
    best = coordesc.load_entry_any_hash(cache, "start", {"coordinate_descent_tuning": True})
    assert best.name == "rebuilt" and calls == [(entry, "other", ["start"])] and entry["XBLOCK"] == 128
    plain = types.SimpleNamespace(_read=lambda: dict(entry, found_by_coordesc=False))
    assert coordesc.load_entry_any_hash(plain, "start", {}) is None  # autotune results are torch's business
    assert coordesc.load_entry_any_hash(types.SimpleNamespace(_read=lambda: None), "start", {}) is None
    assert coordesc.load_entry_any_hash(types.SimpleNamespace(), "start", {}) is None  # another torch's API


def test_a_failure_of_the_fix_leaves_torchs_result(monkeypatch):
    """The wrapper never breaks loading a kernel: torch's own recheck result stands if the fix raises."""
    import torch._inductor.runtime.triton_heuristics as th

    done = []
    wrapped = coordesc._wrap(lambda self, reload: done.append("torch"))

    def broken(*args):
        raise RuntimeError("private API changed")
    monkeypatch.setattr(coordesc, "apply_cached_coordesc", broken)
    t = _autotuner([Cfg("start")])
    wrapped(t, lambda: None)
    assert done == ["torch"] and [r.config.name for r in t.compile_results] == ["start"]
    assert th.check_autotune_cache  # the wrapper looked it up from torch


def test_state_follows_the_environment(monkeypatch):
    if not coordesc._has_recheck():
        assert coordesc.state() == "n/a"
        return
    monkeypatch.delenv(coordesc.ENV, raising=False)
    assert coordesc.state() == "on"
    monkeypatch.setenv(coordesc.ENV, "0")
    assert coordesc.state() == "off"


def test_installed_by_default_off_with_env_and_restored(monkeypatch):
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    if not hasattr(CachingAutotuner, "recheck_autotune_cache"):
        pytest.skip("this torch has no CachingAutotuner.recheck_autotune_cache (before 2.8)")
    from sd3plugin.global_settings import GlobalSettings

    settings = GlobalSettings()  # its own ledger: pipelines optimized by earlier tests may hold the method
    monkeypatch.setattr(coordesc, "GLOBAL_SETTINGS", settings)
    current = CachingAutotuner.recheck_autotune_cache
    original = getattr(current, "sd3plugin_original", current)
    monkeypatch.setattr(CachingAutotuner, "recheck_autotune_cache", original)
    monkeypatch.setenv(coordesc.ENV, "0")
    assert coordesc.install() is False and CachingAutotuner.recheck_autotune_cache is original
    monkeypatch.delenv(coordesc.ENV)
    try:
        assert coordesc.install() is True
        wrapped = CachingAutotuner.recheck_autotune_cache
        assert wrapped is not original and wrapped.sd3plugin_original is original
        assert coordesc.install() is True and CachingAutotuner.recheck_autotune_cache is wrapped  # once
    finally:
        settings.restore()
    assert CachingAutotuner.recheck_autotune_cache is original
