"""Presets are checked against the free memory before they are built or loaded; the build shows progress."""
from __future__ import annotations

import pytest
import torch

from sd3plugin import memory_check
from sd3plugin.config import compose
from sd3plugin.errors import ModelError

GiB = 2**30


def test_parameter_counts_match_a_real_build():
    from sd3plugin.models import build_random_pipeline

    parts, _, _ = build_random_pipeline("tiny")
    real = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if m is not None}
    assert {k: v for k, v in memory_check.preset_parameters("tiny").items() if v} == real
    sd3 = memory_check.preset_parameters("sd3-medium")  # meta device: no memory taken
    assert 7.5e9 < sum(sd3.values()) < 7.9e9 and 2.0e9 < sd3["transformer"] < 2.1e9


def test_build_peak_is_finished_components_plus_the_one_drawn_in_float32(monkeypatch):
    monkeypatch.setattr(memory_check, "preset_parameters", lambda arch: {"a": 10, "b": 100, "c": 1})
    # float16 (2 bytes): a in float32 = 40; then a in fp16 (20) + b in float32 (400) = 420; then 220 + 4
    assert memory_check.build_bytes("x", 2) == 420
    assert memory_check.pipeline_bytes("x", 2) == 222


def test_a_preset_larger_than_the_free_memory_is_refused(monkeypatch):
    monkeypatch.setattr(memory_check, "available_ram_bytes", lambda: 8 * GiB)
    with pytest.raises(ModelError) as err:
        memory_check.check_preset_fits("sd3-medium", torch.float32, "cpu", building=True)
    msg = str(err.value)
    assert "model=sd3-medium (7.7 B parameters in float32) needs about 38.0 GiB of host memory" in msg
    assert "8.0 GiB available" in msg and "model=tiny" in msg and "device=cuda" in msg
    memory_check.check_preset_fits("tiny", torch.float32, "cpu", building=True)  # fits in 8 GiB


def test_gpu_memory_is_checked_when_building_on_the_gpu(monkeypatch):
    monkeypatch.setattr(memory_check, "available_ram_bytes", lambda: 1024 * GiB)
    monkeypatch.setattr(memory_check, "free_gpu_bytes", lambda: 12 * GiB)
    with pytest.raises(ModelError, match=r"needs about 23\.2 GiB of free GPU memory to build it, but this "
                                         r"machine has 12\.0 GiB available"):
        memory_check.check_preset_fits("sd3-medium", torch.float16, "cuda", building=True)
    with pytest.raises(ModelError, match=r"14\.3 GiB of free GPU memory to hold it"):
        memory_check.check_preset_fits("sd3-medium", torch.float16, "cuda", building=False)
    monkeypatch.setattr(memory_check, "free_gpu_bytes", lambda: 80 * GiB)
    memory_check.check_preset_fits("sd3-medium", torch.float16, "cuda", building=True)


def test_model_path_refuses_before_building(monkeypatch, tmp_path):
    import sd3plugin.pipeline as pipeline

    monkeypatch.setattr(memory_check, "available_ram_bytes", lambda: 2 * GiB)

    def must_not_build(*args, **kwargs):
        raise AssertionError("built although it does not fit")

    monkeypatch.setattr(pipeline, "save_random_pipeline", must_not_build)
    cfg = compose(overrides=["model=sd3-medium", "device=cpu", f"cache_dir={tmp_path}"])
    with pytest.raises(ModelError, match="2.0 GiB available"):
        pipeline.model_path(cfg)
    assert not (tmp_path / "models").exists()  # a refused build leaves no folder and no empty lock file


def test_the_probe_reads_this_machine():
    ram = memory_check.available_ram_bytes()
    assert ram is None or 0 < ram < 2**50


class Recorder:
    def __init__(self):
        self.calls = []

    def built(self, name):
        self.calls.append(("built", name))

    def writing(self):
        self.calls.append(("writing", None))

    def written(self, name):
        self.calls.append(("written", name))


def test_progress_hears_every_component_drawn_and_written(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sd3plugin.models import save_random_pipeline

    progress = Recorder()
    path = save_random_pipeline("tiny", tmp_path / "tiny", progress=progress)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert [n for kind, n in progress.calls if kind == "built"] == names
    assert sorted(n for kind, n in progress.calls if kind == "written") == sorted(names)
    assert progress.calls.index(("writing", None)) == len(names)
    assert list((path / "transformer").glob("*.safetensors"))  # the wrapped save kept safe_serialization
    StableDiffusion3Pipeline.from_pretrained(path)
