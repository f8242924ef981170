"""Config composition, presets, overrides and every validation error (no model is loaded)."""
import pytest
from omegaconf import OmegaConf

import sd3plugin
from sd3plugin.config import compose, parse_mode
from sd3plugin.config.compose import group_options
from sd3plugin.config.legacy import translate
from sd3plugin.config.modes import PRESETS, TOKENS, inductor_options, torch_flags


def test_defaults_compose():
    cfg = compose()
    assert cfg.model == "tiny" and cfg.backend == "auto" and cfg.on_error == "fallback"
    assert cfg.mode.name == "default" and parse_mode(cfg.mode.spec) == ("max-optimize", "low-precision")
    assert cfg.memory_format.name == "channels_last" and cfg.dynamic.enabled is False
    assert cfg.quant.type == "none"


def test_group_overrides_and_presets():
    cfg = compose(overrides=["mode=max-autotune", "dynamic=true", "memory_format=preserve", "height=128"])
    assert cfg.mode.spec == "max-optimize:max-autotune:low-precision"
    assert cfg.dynamic.enabled is True and cfg.memory_format.name == "preserve" and cfg.height == 128
    assert set(group_options("mode")) >= {"default", "max-autotune", "seed", "O2", "O3", "none", "fast-compile"}
    for name in group_options("mode"):
        parse_mode(compose(overrides=[f"mode={name}"]).mode.spec)  # every preset is valid


def test_free_spec_and_seed_tokens():
    seed = "max-optimize:max-autotune:low-precision:cudagraphs:cache-all:freezing:benchmark"
    cfg = compose(overrides=[f"mode.spec={seed}"])
    assert parse_mode(cfg.mode.spec) == tuple(seed.split(":"))
    assert parse_mode("O3") == tuple(PRESETS["O3"].split(":"))
    assert parse_mode("jit:disable-runtime-fusion:low-precision") == ("jit", "disable-runtime-fusion",
                                                                      "low-precision")


def test_tokens_map_to_real_inductor_settings():
    import torch._inductor.config as ic

    opts = inductor_options(tuple(TOKENS), "cuda")
    for key in opts:  # every key we set exists in inductor's config
        obj = ic
        for part in key.split("."):
            obj = getattr(obj, part)
    assert inductor_options(("max-autotune",), "cpu")["max_autotune"] is True
    assert "triton.cudagraphs" not in inductor_options(("cudagraphs",), "cpu")
    assert inductor_options(("cudagraphs",), "cuda")["triton.cudagraphs"] is True
    assert torch_flags(("benchmark",), "cuda") == {"cudnn.benchmark": True}
    assert torch_flags(("benchmark",), "cpu") == {}


def test_yaml_file_and_mapping_cfg(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("mode: max-autotune\nsteps: 3\nbackend: eager\n")
    cfg = compose(str(path), ["steps=5"])
    assert cfg.mode.name == "max-autotune" and cfg.steps == 5 and cfg.backend == "eager"
    cfg = compose({"dynamic": "true", "seed": 7})
    assert cfg.dynamic.enabled is True and cfg.seed == 7


@pytest.mark.parametrize("overrides, needle", [
    (["mode=bogus"], "unknown mode option 'bogus'; valid options: O2, O3"),
    (["foo=1"], "unknown config key 'foo'; valid keys: model, backend"),
    (["mode.spec=max-optimize:bogus"], "unknown mode token 'bogus'"),
    (["mode.spec=jit:max-autotune"], "contradict"),
    (["mode.spec=quant"], "mode token 'quant' needs a quantization preset"),
    (["height=65"], "height=65 is not a multiple of 4"),
    (["width=1000", "model=sd3-medium"], "width=1000 is not a multiple of 16"),
    (["height=4096", "model=sd3-medium"], "larger than model='sd3-medium' can take"),
    (["backend=xyz"], "backend='xyz' is not valid; choose one of: auto, inductor, nexfort, eager"),
    (["on_error=ignore"], "on_error='ignore' is not valid"),
    (["dynamic=maybe"], "unknown dynamic option 'maybe'; valid options: false, true"),
    (["memory_format=nchw"], "unknown memory_format option 'nchw'"),
    (["quant=fp4"], "unknown quant option 'fp4'"),
    (["steps=abc"], "steps=abc"),
    (["steps=0"], "steps=0 must be at least 1"),
    (["model=sd4-giant"], None),  # unknown preset is treated as a Hub id / folder: not an error here
])
def test_validation_errors(overrides, needle):
    if needle is None:
        compose(overrides=overrides)
        return
    with pytest.raises(sd3plugin.ConfigError) as err:
        compose(overrides=overrides)
    assert isinstance(err.value, ValueError)
    assert needle in str(err.value)


def test_compose_keeps_hydra_state_of_an_app():
    from hydra.core.global_hydra import GlobalHydra

    assert not GlobalHydra.instance().is_initialized()
    compose()
    assert not GlobalHydra.instance().is_initialized()


def test_seed_compiler_config_translation():
    argv = ["--compiler-config", '{"mode": "max-optimize:max-autotune:low-precision", '
            '"memory_format": "channels_last", "dynamic": true}', "--height", "512", "--width", "768",
            "--saved-image", "out/sd3.png", "steps=3"]
    overrides = translate(argv)
    assert overrides == ["mode.spec='max-optimize:max-autotune:low-precision'", "memory_format=channels_last",
                         "dynamic=true", "height=512", "width=768", "image_path='out/sd3.png'", "steps=3"]
    cfg = compose(overrides=overrides + ["model=sd3-medium"])
    assert cfg.dynamic.enabled and cfg.height == 512 and cfg.mode.spec.startswith("max-optimize")
    with pytest.raises(sd3plugin.ConfigError, match="--compiler-config must be a JSON object"):
        translate(["--compiler-config", "{mode: x}"])
    assert translate(["--compiler", "none"]) == ["backend=eager"]


def test_composed_config_is_plain_yaml():
    cfg = compose(overrides=["mode=seed"])
    text = OmegaConf.to_yaml(cfg)
    assert "cudagraphs" in text and "cache_dir" in text
