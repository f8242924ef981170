"""Composing a config never asks the hardware; check_hardware does, when a plan is applied."""
import os
import subprocess
import sys
import types

import pytest
import torch

import sd3plugin
from sd3plugin.config import check_hardware, compose
from sd3plugin.errors import ConfigError

FP8 = ("fp8_e4m3_e4m3_dynamic", "fp8_e4m3_e4m3_dynamic_per_tensor", "fp8_e4m3_e4m3_weightonly")


def _run_app(args, timeout=120):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")  # a CPU machine, even on a GPU host
    return subprocess.run([sys.executable, "-m", "sd3plugin", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def no_hardware_probe(monkeypatch):
    def probe(*a, **k):
        raise AssertionError("composing a config asked the hardware")
    for name in ("is_available", "get_device_capability", "get_device_name", "device_count"):
        monkeypatch.setattr(torch.cuda, name, probe)


def _fake_gpu(monkeypatch, name, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


@pytest.mark.parametrize("name", FP8)
def test_composing_fp8_never_probes_the_hardware(no_hardware_probe, name):
    for device in ("auto", "cuda"):
        cfg = compose(overrides=[f"quant={name}", f"device={device}"])
        assert cfg.quant.type == name and cfg.device == device


def test_composing_fp8_on_cpu_succeeds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compose(overrides=["quant=fp8_e4m3_e4m3_dynamic"]).quant.type == "fp8_e4m3_e4m3_dynamic"


def test_cfg_job_with_fp8_exits_0_on_cpu():
    res = _run_app(["--cfg", "job", "quant=fp8_e4m3_e4m3_dynamic"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "type: fp8_e4m3_e4m3_dynamic" in res.stdout


def test_a_config_contradicting_itself_still_fails_at_composition(no_hardware_probe):
    with pytest.raises(ConfigError, match="quant=fp8_e4m3_e4m3_dynamic needs an NVIDIA GPU .* this run is on CPU; "
                                          "use quant=int8_dynamic or quant=none"):
        compose(overrides=["quant=fp8_e4m3_e4m3_dynamic", "device=cpu"])
    with pytest.raises(ConfigError, match="needs bfloat16 weights but dtype=float16"):
        compose(overrides=["quant=fp8_e4m3_e4m3_dynamic", "dtype=float16"])


@pytest.mark.parametrize("name", FP8)
def test_check_hardware_on_a_machine_without_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cpu", "auto"):
        with pytest.raises(ConfigError) as err:
            check_hardware(compose(overrides=[f"quant={name}", f"device={device}"]) if device != "cpu"
                           else types.SimpleNamespace(device="cpu", quant=name))
        msg = str(err.value)
        assert f"quant={name}" in msg and "CPU" in msg and "8.9" in msg
        assert "quant=int8_dynamic" in msg and "quant=none" in msg
    with pytest.raises(ConfigError, match="but no CUDA GPU is visible to torch; use quant=int8_dynamic"):
        check_hardware(compose(overrides=[f"quant={name}", "device=cuda"]))
    assert check_hardware(compose(overrides=["quant=int8_dynamic"])) == "cpu"
    with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is visible"):
        check_hardware(compose(overrides=["device=cuda"]))


def test_check_hardware_names_the_gpu_and_its_capability(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    cfg = compose(overrides=["quant=fp8_e4m3_e4m3_dynamic_per_tensor", "device=cuda"])  # composes: pure
    with pytest.raises(ConfigError) as err:
        check_hardware(cfg)
    msg = str(err.value)
    assert "NVIDIA A100-SXM4-80GB" in msg and "compute capability 8.0" in msg
    assert "quant=int8_dynamic" in msg and "quant=none" in msg
    assert check_hardware(compose(overrides=["quant=int8_dynamic", "device=cuda"])) == "cuda"  # int8: any GPU
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    assert check_hardware(cfg) == "cuda"
    plan = types.SimpleNamespace(device="cuda", quant=types.SimpleNamespace(type="fp8_e4m3_e4m3_dynamic"))
    assert check_hardware(plan) == "cuda" and check_hardware(plan, device="auto") == "cuda"


def test_plus_prefix_with_an_unknown_key_is_an_error():
    with pytest.raises(sd3plugin.ConfigError, match="unknown config key 'stepz'; valid keys: model, backend"):
        compose(overrides=["+stepz=4"])
    with pytest.raises(sd3plugin.ConfigError, match="unknown config key 'quant.typo'"):
        compose({"steps": 2}, ["++quant.typo=1"])
    cfg = compose(overrides=["+backend_options.max_autotune_gemm_backends=TRITON"])
    assert cfg.backend_options.max_autotune_gemm_backends == "TRITON"
    assert compose({"steps": 2}, ["+backend_options.x=1"]).backend_options.x == 1


def test_plus_prefix_with_an_unknown_key_exits_2():
    res = _run_app(["+stepz=4"])
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "unknown config key 'stepz'; valid keys: model" in res.stderr and "Traceback" not in res.stderr
