"""The cache-dit names the seam (sd3plugin/compat/cache_dit.py) uses: an upgrade that drops one fails here by
name. What the seam does on a pipeline is tested through step_cache in tests/test_step_cache.py."""
import dataclasses
import inspect

import pytest

from sd3plugin.compat import cache_dit as seam

pytestmark = pytest.mark.skipif(not seam.available(), reason="cache-dit not installed (extra 'cache')")


def test_the_cache_dit_names_the_seam_uses_are_there():
    import cache_dit
    from cache_dit.summary import CacheStats

    for name in ("enable_cache", "disable_cache", "summary", "DBCacheConfig", "TaylorSeerCalibratorConfig"):
        assert hasattr(cache_dit, name), name
    fields = {f.name for f in dataclasses.fields(cache_dit.DBCacheConfig)}
    assert {"Fn_compute_blocks", "Bn_compute_blocks", "residual_diff_threshold", "max_warmup_steps",
            "max_cached_steps", "max_continuous_cached_steps"} <= fields
    assert "taylorseer_order" in {f.name for f in dataclasses.fields(cache_dit.TaylorSeerCalibratorConfig)}
    assert {"cached_steps", "accumulated_executed_steps"} <= {f.name for f in dataclasses.fields(CacheStats)}
    assert {"cache_config", "calibrator_config"} <= set(inspect.signature(cache_dit.enable_cache).parameters)
    assert "logging" in inspect.signature(cache_dit.summary).parameters
    assert seam.version() == "1.5.3"


def test_taylorseer_without_back_blocks_is_refused_before_cache_dit_fails():
    with pytest.raises(ValueError, match="TaylorSeer needs bn >= 1"):
        seam.enable(object(), seam.StepCacheSettings(fn=1, bn=0, taylorseer_order=1))
