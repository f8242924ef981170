"""The Hydra internals behind sd3plugin.compat.hydra: fails loudly when an installed Hydra changes them."""
import hydra
import pytest
from omegaconf import OmegaConf

from sd3plugin.compat import hydra as compat_hydra


def test_installed_hydra_has_what_the_seam_relies_on():
    problems = compat_hydra.check()
    assert problems == [], f"hydra {hydra.__version__}: " + "; ".join(problems)


def test_apply_overrides_keeps_hydras_semantics():
    cfg = OmegaConf.create({"steps": 28, "quant": {"type": "none", "include": []}, "opts": {}, "gone": 1})
    compat_hydra.apply_overrides(cfg, ["steps=3", "quant.include=[a,'b*']", "+opts.x=1", "~gone"])
    assert OmegaConf.to_container(cfg) == {"steps": 3, "quant": {"type": "none", "include": ["a", "b*"]},
                                           "opts": {"x": 1}}
    assert OmegaConf.is_struct(cfg)
    with pytest.raises(Exception, match="stepz"):  # struct: a plain override cannot add a key
        compat_hydra.apply_overrides(cfg, ["stepz=4"])


def test_parse_overrides_tells_adds_from_sets():
    parsed = compat_hydra.parse_overrides(["a=1", "+b=2", "++c=3"])
    assert [(o.key_or_group, o.is_add(), o.is_force_add()) for o in parsed] == [
        ("a", False, False), ("b", True, False), ("c", False, True)]


def test_isolated_global_hydra_restores_an_initialised_hydra():
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module="sd3plugin.conf", version_base=None):
        outer = GlobalHydra.instance().hydra
        with compat_hydra.isolated_global_hydra():
            assert not GlobalHydra.instance().is_initialized()
            with initialize_config_module(config_module="sd3plugin.conf", version_base=None):
                assert GlobalHydra.instance().hydra is not outer
        assert GlobalHydra.instance().hydra is outer
    assert not GlobalHydra.instance().is_initialized()


def test_check_reports_a_missing_private_method(monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    monkeypatch.delattr(ConfigLoaderImpl, "_apply_overrides_to_config")
    problems = compat_hydra.check()
    assert len(problems) == 1 and compat_hydra.PRIVATE_APPLY in problems[0]
    monkeypatch.setattr(ConfigLoaderImpl, "_apply_overrides_to_config", staticmethod(lambda cfg, overrides: None),
                        raising=False)
    assert "expected ('overrides', 'cfg')" in compat_hydra.check()[0]
