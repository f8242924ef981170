"""The from_pretrained hook: every SD3 loading entry point, pass-through, idempotence, exact uninstall."""
import os
import subprocess
import sys

import pytest
import torch
from diffusers import (AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image,
                       DiffusionPipeline, SD3ControlNetModel, SD3Transformer2DModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Img2ImgPipeline,
                       StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline)

import sd3plugin
from sd3plugin.global_settings import GLOBAL_SETTINGS

EAGER = ["backend=eager"]


def _descriptors():
    return DiffusionPipeline.__dict__["from_pretrained"], SD3Transformer2DModel.__dict__.get("from_pretrained")


def test_enable_twice_is_one_hook_and_disable_restores_identity():
    before = _descriptors()
    assert before[1] is None  # diffusers defines it on ModelMixin only
    h1 = sd3plugin.enable(overrides=EAGER)
    patched = _descriptors()
    assert patched[0] is not before[0] and patched[1] is not None
    h2 = sd3plugin.enable(overrides=EAGER + ["seed=3"])
    assert h2 is h1 and _descriptors() == patched and h2.cfg.seed == 3
    sd3plugin.disable()
    assert _descriptors()[0] is before[0]
    assert "from_pretrained" not in SD3Transformer2DModel.__dict__
    assert not sd3plugin.is_enabled()


def test_enable_validates_before_patching():
    before = _descriptors()
    with pytest.raises(sd3plugin.ConfigError, match="unknown mode option"):
        sd3plugin.enable(overrides=["mode=nope"])
    assert _descriptors() == before and not sd3plugin.is_enabled()


def test_context_manager_form(tiny_path):
    before = _descriptors()
    with sd3plugin.enabled(overrides=EAGER):
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    assert _descriptors() == before
    assert sd3plugin.report(pipe)["backend"] == "eager"
    # loaded outside the hook: untouched
    assert sd3plugin.report(StableDiffusion3Pipeline.from_pretrained(tiny_path)) == {"optimized": False}


@pytest.mark.parametrize("loader", [
    StableDiffusion3Pipeline, DiffusionPipeline, AutoPipelineForText2Image, AutoPipelineForImage2Image,
    AutoPipelineForInpainting, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline])
def test_every_pipeline_entry_point_is_hooked(tiny_path, loader):
    with sd3plugin.enabled(overrides=EAGER + ["memory_format=channels_last"]):
        pipe = loader.from_pretrained(tiny_path)
    rep = sd3plugin.report(pipe)
    assert rep["optimized"] and rep["backend"] == "eager" and rep["backend_reason"] == "requested backend=eager"
    assert rep is not sd3plugin.report(pipe)  # a copy
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_controlnet_pipeline_is_hooked(tiny_path):
    base = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    controlnet = SD3ControlNetModel.from_transformer(base, num_layers=1)
    with sd3plugin.enabled(overrides=EAGER):
        pipe = StableDiffusion3ControlNetPipeline.from_pretrained(tiny_path, controlnet=controlnet)
    assert sd3plugin.report(pipe)["optimized"]


def test_transformer_from_pretrained_is_hooked(tiny_path):
    with sd3plugin.enabled(overrides=EAGER):
        model = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    assert sd3plugin.report(model)["backend"] == "eager"


def test_non_sd3_pipeline_passes_through(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with sd3plugin.enabled(overrides=EAGER):
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "ddpm")
    assert type(pipe) is DDPMPipeline and sd3plugin.report(pipe) == {"optimized": False}
    assert "forward" not in pipe.unet.__dict__


def test_disable_restores_global_settings():
    sd3plugin.disable()
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # a pipeline optimized earlier may hold this setting
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", "/tmp/somewhere-else")
    GLOBAL_SETTINGS.set_flag("cudnn.benchmark", True)
    sd3plugin.disable()
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_auto_import_enables_from_environment(tiny_path, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backend: eager\n")
    code = ("import sd3plugin.auto, sd3plugin\n"
            "from diffusers import StableDiffusion3Pipeline\n"
            f"p = StableDiffusion3Pipeline.from_pretrained({str(tiny_path)!r})\n"
            "r = sd3plugin.report(p); print(r['backend'], r['memory_format'], r['config']['seed'])\n")
    env = dict(os.environ, SD3PLUGIN_CONFIG=str(cfg), SD3PLUGIN_OVERRIDES="seed=11 memory_format=preserve")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "eager preserve 11"
    env["SD3PLUGIN_OVERRIDES"] = "mode=wrong"
    out = subprocess.run([sys.executable, "-c", "import sd3plugin.auto"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "unknown mode option 'wrong'" in out.stderr


def test_module_attributes_are_recorded_and_restored():
    import torch._inductor.config as ic

    before = ic.max_autotune
    GLOBAL_SETTINGS.set_flag("torch._inductor.config:max_autotune", not before)
    assert ic.max_autotune is (not before)
    sd3plugin.disable()
    assert ic.max_autotune is before


def test_recorded_changes_are_reverted_and_later_changes_kept():
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with GLOBAL_SETTINGS.recording() as changes:
        GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_CACHE_DIR", "/tmp/plan-dir")
        GLOBAL_SETTINGS.set_flag("cudnn.benchmark", True)
    GLOBAL_SETTINGS.set_env("TRITON_CACHE_DIR", "/tmp/other")  # not recorded: stays
    assert len(changes) == 2
    GLOBAL_SETTINGS.revert(changes)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and torch.backends.cudnn.benchmark is False
    assert os.environ["TRITON_CACHE_DIR"] == "/tmp/other"
