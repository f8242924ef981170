"""Quantization: presets, hardware/dtype errors, layer selection (default, JSON, patterns), int8_dynamic on
the tiny pipeline eager and compiled, the seed's flags, nexfort's licensed path. fp8 runs only on a GPU."""
import json
import logging
import subprocess
import sys
import types

import pytest
import torch
import torch._dynamo
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

import sd3plugin
from sd3plugin import quant
from sd3plugin.config import compose
from sd3plugin.config.legacy import translate
from sd3plugin.errors import ConfigError
from sd3plugin.models import ARCHITECTURES
from sd3plugin.pipeline import dtype_kwarg
from sd3plugin.apps.quality import compare_latents, random_transformer_inputs

from .conftest import tiny_call

pytest.importorskip("torchao")

FP8 = ("fp8_e4m3_e4m3_dynamic", "fp8_e4m3_e4m3_dynamic_per_tensor", "fp8_e4m3_e4m3_weightonly")
# int8 per-token/per-channel on the tiny random pipeline, 4 steps: measured 1.6e-3 relative error of the
# latents. 2e-2 leaves room for other CPUs; a broken quantizer (wrong scales, dropped bias) gives order 1.
INT8_TOL = 2e-2
# Compiled vs eager, both quantized: the same int8 math, only fp32 sums reordered (measured 2e-4).
COMPILED_TOL = 2e-3
BLOCK_IMAGE_STREAM = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
DEFAULT_INT8 = [f"transformer_blocks.{b}.{m}" for b in (0, 1) for m in BLOCK_IMAGE_STREAM]


def _qcfg(**kw):
    return compose(overrides=[f"quant.{k}={v}" if k != "type" else f"quant={v}" for k, v in kw.items()]).quant


def _tiny_transformer():
    torch.manual_seed(0)
    return SD3Transformer2DModel(**ARCHITECTURES["tiny"].transformer).eval()


def _quantized_names(transformer):
    return sorted(n for n, m in transformer.named_modules()
                  if isinstance(m, torch.nn.Linear) and quant._is_quantized(m.weight))


@pytest.fixture(scope="module")
def eager_latents(tiny_path):
    return StableDiffusion3Pipeline.from_pretrained(tiny_path)(**tiny_call()).images


# ----------------------------------------------------------------------------------------------------
# presets and config-time errors
# ----------------------------------------------------------------------------------------------------

def test_presets_exist_and_map_to_torchao():
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, PerTensor)

    assert set(quant.QUANT_TYPES) == {"none", "int8_dynamic", *FP8}
    from sd3plugin.config.compose import group_options

    assert set(group_options("quant")) == set(quant.QUANT_TYPES)  # one YAML per preset
    row = quant.PRESETS["fp8_e4m3_e4m3_dynamic"].torchao_config()
    assert isinstance(row, Float8DynamicActivationFloat8WeightConfig)
    assert all(isinstance(g, PerRow) for g in row.granularity)
    tensor = quant.PRESETS["fp8_e4m3_e4m3_dynamic_per_tensor"].torchao_config()
    assert all(isinstance(g, PerTensor) for g in tensor.granularity)
    assert isinstance(quant.PRESETS["int8_dynamic"].torchao_config(), Int8DynamicActivationInt8WeightConfig)
    assert isinstance(quant.PRESETS["fp8_e4m3_e4m3_weightonly"].torchao_config(), Float8WeightOnlyConfig)
    # no preset changes inductor's process-wide config behind our back
    assert not any(quant.PRESETS[n].torchao_config().set_inductor_config for n in quant.QUANT_TYPES if n != "none")
    assert compose(overrides=["quant=int8_dynamic", "device=cpu"]).quant.type == "int8_dynamic"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
@pytest.mark.parametrize("name", FP8)
def test_fp8_on_cpu_fails_at_config_time(name):
    from sd3plugin.config import check_hardware

    # device=cpu contradicts the preset itself: refused while composing; auto is checked against the machine
    for device in ("cpu", "auto"):
        with pytest.raises(ConfigError) as err:
            check_hardware(compose(overrides=[f"quant={name}", f"device={device}"]))
        msg = str(err.value)
        assert f"quant={name}" in msg and "CPU" in msg and "8.9" in msg
        assert "quant=int8_dynamic" in msg and "quant=none" in msg
    with pytest.raises(ConfigError, match="but no CUDA GPU is visible to torch; use quant=int8_dynamic"):
        check_hardware(compose(overrides=[f"quant={name}", "device=cuda"]))


def _fake_gpu(monkeypatch, name, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_fp8_on_old_gpu_names_gpu_and_capability(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    from sd3plugin.config import check_hardware

    with pytest.raises(ConfigError) as err:
        check_hardware(compose(overrides=["quant=fp8_e4m3_e4m3_dynamic_per_tensor", "device=cuda"]))
    msg = str(err.value)
    assert "NVIDIA A100-SXM4-80GB" in msg and "compute capability 8.0" in msg
    assert "quant=int8_dynamic" in msg and "quant=none" in msg
    quant.check_device("int8_dynamic", "cuda")  # int8 runs on any GPU
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    quant.check_device("fp8_e4m3_e4m3_dynamic_per_tensor", "cuda")  # no error


def test_rowwise_fp8_needs_bfloat16(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(ConfigError, match="needs bfloat16 weights but dtype=float16; set dtype=bfloat16"):
        compose(overrides=["quant=fp8_e4m3_e4m3_dynamic", "device=cuda", "dtype=float16"])
    assert compose(overrides=["quant=fp8_e4m3_e4m3_dynamic", "device=cuda", "dtype=bfloat16"])
    assert quant.preferred_dtype("fp8_e4m3_e4m3_dynamic") == "bfloat16"
    assert quant.preferred_dtype("int8_dynamic") is None
    # a float16 model reaching quantize() fails before any weight changes
    t = _tiny_transformer().half()
    with pytest.raises(ConfigError, match="needs bfloat16 weights but the transformer is float16"):
        quant.quantize(t, compose(overrides=["quant=fp8_e4m3_e4m3_dynamic", "device=cuda"]).quant, "cuda")
    assert _quantized_names(t) == []


@pytest.mark.parametrize("overrides, message", [
    (["quant=fp4"], "unknown quant option 'fp4'"),
    (["quant=int8_dynamic", "quant.top_percentage=0"], "quant.top_percentage=0.0 must be in (0, 100]"),
    (["quant=int8_dynamic", "quant.top_percentage=150"], "must be in (0, 100]"),
    (["quant=int8_dynamic", "quant.submodules_config_path=/nonexistent/fp8_e4m3.json"],
     "quant.submodules_config_path='/nonexistent/fp8_e4m3.json' does not exist"),
    (["mode.spec=quant:max-optimize"], "mode token 'quant' needs a quantization preset"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides=overrides + ["device=cpu"])
    assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a non-empty JSON object"),
    ('{"transformer_blocks.0.attn.to_q": {"psnr": 40}}', "entries without a numeric 'ssim' metric: "
                                                         "transformer_blocks.0.attn.to_q"),
])
def test_bad_submodules_json(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        compose(overrides=["quant=int8_dynamic", f"quant.submodules_config_path={path}"])


def test_seed_flags_translate(tmp_path):
    path = tmp_path / "fp8_e4m3.json"
    path.write_text(json.dumps({"transformer_blocks.0.attn.to_q": {"ssim": 0.99}}))
    overrides = translate(["--quantize-config", '{"quant_type": "int8_dynamic"}',
                           "--quant-submodules-config-path", str(path)])
    cfg = compose(overrides=overrides + ["device=cpu"])
    assert cfg.quant.type == "int8_dynamic" and cfg.quant.submodules_config_path == str(path)


# ----------------------------------------------------------------------------------------------------
# layer selection
# ----------------------------------------------------------------------------------------------------

def test_default_selection_leaves_out_embedders_output_and_text_stream():
    selected, skipped, how = quant.select_modules(_tiny_transformer(), _qcfg(type="int8_dynamic"))
    assert how == "default" and selected == DEFAULT_INT8
    for name in ("time_text_embed.timestep_embedder.linear_1", "context_embedder", "proj_out",
                 "norm_out.linear", "transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn.add_q_proj",
                 "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.attn.to_add_out"):
        assert name in skipped and skipped[name].startswith("default: "), name
    assert "embedder" in skipped["context_embedder"] and "text stream" in skipped["transformer_blocks.0.attn.add_k_proj"]


def test_weight_only_default_takes_every_block_linear():
    from omegaconf import OmegaConf

    qcfg = OmegaConf.merge(compose(overrides=["device=cpu"]).quant, {"type": "fp8_e4m3_e4m3_weightonly"})
    selected, skipped, _ = quant.select_modules(_tiny_transformer(), qcfg)
    assert len(selected) == 25 and all(n.startswith("transformer_blocks.") for n in selected)
    assert sorted(skipped) == ["context_embedder", "norm_out.linear", "proj_out",
                               *[f"time_text_embed.{e}.linear_{i}" for e in ("text_embedder", "timestep_embedder")
                                 for i in (1, 2)]]


def test_weight_only_fp8_applies_on_cpu_when_device_check_is_bypassed(monkeypatch):
    """The fp8 weight-only path itself (torchao dequantizes on CPU): what the GPU run will quantize."""
    from omegaconf import OmegaConf

    monkeypatch.setattr(quant, "check_device", lambda name, device: None)
    t = _tiny_transformer().to(torch.bfloat16)
    inputs = random_transformer_inputs(t.config, 64, 64, text_tokens=16, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = t(**inputs).sample
    qcfg = OmegaConf.merge(compose(overrides=["device=cpu"]).quant, {"type": "fp8_e4m3_e4m3_weightonly"})
    rep = quant.quantize(t, qcfg, "cpu")
    assert len(rep["modules"]) == 25 and _quantized_names(t) == sorted(rep["modules"])
    assert {type(t.get_submodule(n).weight).__name__ for n in rep["modules"]} == {"Float8Tensor"}
    with torch.no_grad():
        err = compare_latents(ref, t(**inputs).sample)
    assert 0 < err["rel_error"] < 0.1, err  # e4m3 keeps 3 mantissa bits; measured 4.7e-3


def test_default_selection_follows_fused_qkv():
    t = _tiny_transformer()
    t.fuse_qkv_projections()
    selected, skipped, _ = quant.select_modules(t, _qcfg(type="int8_dynamic"))
    assert "transformer_blocks.0.attn.to_qkv" in selected and "transformer_blocks.0.attn.to_q" not in selected
    assert "transformer_blocks.0.attn.to_q" not in skipped  # unused after fusing: not a layer of the forward
    assert "transformer_blocks.0.attn.to_added_qkv" in skipped


def _write_json(tmp_path, entries):
    path = tmp_path / "fp8_e4m3.json"
    path.write_text(json.dumps({k: {"ssim": v, "mse": 1 - v} for k, v in entries.items()}))
    return path


def test_json_selection_takes_top_percentage_by_ssim(tmp_path):
    path = _write_json(tmp_path, {"transformer_blocks.0.attn.to_q": 0.999, "transformer.proj_out": 0.998,
                                  "transformer_blocks.1.ff.net.2": 0.95, "context_embedder": 0.90})
    t = _tiny_transformer()
    sel, skipped, how = quant.select_modules(t, _qcfg(type="int8_dynamic", submodules_config_path=path,
                                                       top_percentage=50))
    assert sel == ["transformer_blocks.0.attn.to_q", "proj_out"] and how == "json top 50.0%"
    assert skipped["transformer_blocks.1.ff.net.2"] == "not in JSON top list"
    sel, _, _ = quant.select_modules(t, _qcfg(type="int8_dynamic", submodules_config_path=path))
    assert len(sel) == 4  # 100 %: every listed module, even ones the default leaves out
    # fused attention: the JSON's to_q stands for the fused to_qkv
    t.fuse_qkv_projections()
    sel, _, _ = quant.select_modules(t, _qcfg(type="int8_dynamic", submodules_config_path=path, top_percentage=50))
    assert sel == ["transformer_blocks.0.attn.to_qkv", "proj_out"]


def test_json_with_unknown_modules_lists_them_and_changes_nothing(tiny_path, tmp_path):
    path = _write_json(tmp_path, {"transformer_blocks.0.attn.to_q": 0.99, "transformer_blocks.7.attn.to_q": 0.98,
                                  "down_blocks.0.proj": 0.97})
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    with pytest.raises(ConfigError) as err:
        sd3plugin.optimize(pipe, overrides=["quant=int8_dynamic", "backend=inductor",
                                            f"quant.submodules_config_path={path}"])
    msg = str(err.value)
    assert "names 2 module(s) this transformer does not have" in msg
    assert "down_blocks.0.proj" in msg and "transformer_blocks.7.attn.to_q" in msg
    assert "transformer_blocks.0.attn.to_q," not in msg
    assert sd3plugin.report(pipe) == {"optimized": False}
    assert _quantized_names(pipe.transformer) == []
    assert "Fused" not in type(pipe.transformer.transformer_blocks[0].attn.processor).__name__


def test_include_and_exclude_patterns():
    t = _tiny_transformer()
    sel, skipped, how = quant.select_modules(t, _qcfg(type="int8_dynamic", include="['transformer_blocks.0.*']",
                                                       exclude="['*.ff*', '*norm*']"))
    assert how == "include"
    assert sel == [f"transformer_blocks.0.attn.{m}" for m in
                   ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out")]
    assert skipped["transformer_blocks.0.ff.net.2"] == "quant.exclude"
    assert skipped["transformer_blocks.1.attn.to_q"] == "not matched by quant.include"
    sel, _, _ = quant.select_modules(t, _qcfg(type="int8_dynamic", exclude="['*.attn.*']"))
    assert sel == [f"transformer_blocks.{b}.{m}" for b in (0, 1) for m in ("ff.net.0.proj", "ff.net.2")]
    with pytest.raises(ConfigError, match=r"quant.exclude pattern\(s\) '\*.unet.\*' match no module"):
        quant.select_modules(t, _qcfg(type="int8_dynamic", exclude="['*.unet.*']"))


# ----------------------------------------------------------------------------------------------------
# int8_dynamic on the tiny pipeline
# ----------------------------------------------------------------------------------------------------

def test_int8_dynamic_eager_close_to_reference(tiny_path, cache_dir, eager_latents):
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["quant=int8_dynamic", "backend=eager", f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)["quant"]
    assert rep["type"] == "int8_dynamic" and rep["library"].startswith("torchao ")
    assert rep["modules"] == DEFAULT_INT8 and _quantized_names(pipe.transformer) == sorted(DEFAULT_INT8)
    assert rep["num_linear"] == 32 and len(rep["skipped"]) == 32 - len(DEFAULT_INT8)
    out = pipe(**tiny_call()).images
    err = compare_latents(eager_latents, out)
    assert err["finite"] and 0 < err["rel_error"] < INT8_TOL, err  # quantized (not bit-equal), and close
    with pytest.raises(ConfigError, match="quantized already"):
        quant.quantize(pipe.transformer, _qcfg(type="int8_dynamic"), "cpu")


@pytest.mark.slow
def test_int8_dynamic_then_regional_compile_dynamic_shapes(tiny_path, cache_dir, eager_latents):
    """Quantize after fusing QKV, compile the blocks afterwards (dynamic shapes): output equals the eager
    quantized one at two resolutions, and the second resolution reuses the compiled graphs."""
    sizes = [(64, 64), (48, 80)]
    eager_q = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                                 overrides=["quant=int8_dynamic", "backend=eager", "fuse_qkv=false"])
    ref_q = {hw: eager_q(**tiny_call(height=hw[0], width=hw[1])).images for hw in sizes}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["quant=int8_dynamic", "backend=inductor", "on_error=raise",
                                         "dynamic=true", "mode=fast-compile", f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "compiled" and rep["fused_qkv"] is True, rep
    assert rep["compiled_modules"] == ["transformer_blocks.0", "transformer_blocks.1"]
    expected = sorted(n.replace("attn.to_q", "attn.to_qkv") for n in DEFAULT_INT8
                      if not n.endswith(("attn.to_k", "attn.to_v")))
    assert sorted(rep["quant"]["modules"]) == expected
    attn = pipe.transformer.transformer_blocks[0].attn
    # the separate projections are views of the fused weight: quantized too, so no 16-bit copy stays alive
    assert all(quant._is_quantized(getattr(attn, n).weight) for n in ("to_qkv", "to_q", "to_k", "to_v"))
    out = pipe(**tiny_call()).images
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert sd3plugin.report(pipe)["status"] == "compiled"  # no fallback to eager at the first call
    assert compare_latents(ref_q[sizes[0]], out)["rel_error"] < COMPILED_TOL
    assert compare_latents(eager_latents, out)["rel_error"] < INT8_TOL
    out2 = pipe(**tiny_call(height=sizes[1][0], width=sizes[1][1])).images
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert compare_latents(ref_q[sizes[1]], out2)["rel_error"] < COMPILED_TOL


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_seed_command_line_runs_int8(tmp_path, cache_dir):
    """The seed's flags through sd3plugin-run: int8_dynamic with a JSON, eager backend (no compile)."""
    path = _write_json(tmp_path, {"transformer_blocks.0.attn.to_q": 0.999, "transformer_blocks.1.ff.net.2": 0.99})
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "sd3plugin", "--quantize-config", '{"quant_type": "int8_dynamic"}',
           "--quant-submodules-config-path", str(path), "backend=eager", "steps=2", "device=cpu",
           f"output_dir={out_dir}", f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["optimization"]["quant"]["modules"] == ["transformer_blocks.0.attn.to_q",
                                                          "transformer_blocks.1.ff.net.2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_seed_command_line_fp8_on_cpu_exits_2():
    cmd = [sys.executable, "-m", "sd3plugin", "--quantize-config", '{"quant_type": "fp8_e4m3_e4m3_dynamic"}',
           "device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "quant=fp8_e4m3_e4m3_dynamic needs an NVIDIA GPU" in proc.stderr and "int8_dynamic" in proc.stderr


# ----------------------------------------------------------------------------------------------------
# nexfort: licensed quantizer only with a licence key, torchao otherwise
# ----------------------------------------------------------------------------------------------------

def test_nexfort_without_licence_uses_torchao(monkeypatch, caplog):
    monkeypatch.delenv(quant.LICENSE_ENV, raising=False)
    t = _tiny_transformer()
    with caplog.at_level(logging.INFO, logger="sd3plugin"):
        rep = quant.quantize(t, _qcfg(type="int8_dynamic"), "cpu", backend="nexfort")
    assert rep["library"].startswith("torchao") and rep["modules"] == DEFAULT_INT8
    assert "licensed feature" in caplog.text and quant.LICENSE_ENV in caplog.text


def test_nexfort_with_licence_uses_nexfort_quantizer(monkeypatch):
    calls = []

    def fake_quantize(module, quant_type, filter_fn, filter_fn_kwargs):
        calls.append((quant_type, filter_fn, filter_fn_kwargs["allowed_fqns"]))
        for name in filter_fn_kwargs["allowed_fqns"]:  # stand-in for nexfort's module swap
            parent, _, leaf = name.rpartition(".")
            old = module.get_submodule(parent).get_submodule(leaf)
            new = type("NexfortLinear", (torch.nn.Module,), {})()
            new.weight = old.weight
            setattr(module.get_submodule(parent), leaf, new)
        return module

    nexfort = types.ModuleType("nexfort")
    nexfort.__version__ = "0.1.dev330"
    ao = types.ModuleType("nexfort.ao")
    ao.quantize = fake_quantize
    nexfort.ao = ao
    monkeypatch.setitem(sys.modules, "nexfort", nexfort)
    monkeypatch.setitem(sys.modules, "nexfort.ao", ao)
    monkeypatch.setenv(quant.LICENSE_ENV, "test-key")
    rep = quant.quantize(_tiny_transformer(), _qcfg(type="int8_dynamic"), "cpu", backend="nexfort")
    assert calls == [("int8_dynamic", "is_allowed_fqn", DEFAULT_INT8)]
    assert rep["library"] == "nexfort 0.1.dev330" and rep["modules"] == DEFAULT_INT8


# ----------------------------------------------------------------------------------------------------
# fp8 (GPU with compute capability >= 8.9 only)
# ----------------------------------------------------------------------------------------------------

def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FP8)
def test_fp8_tiny_pipeline_on_gpu(tiny_path, cache_dir, name):
    if not _fp8_capable():
        pytest.skip("needs compute capability >= 8.9")
    load = lambda: StableDiffusion3Pipeline.from_pretrained(tiny_path, **{dtype_kwarg(): torch.bfloat16}).to("cuda")
    ref = load()(**tiny_call(generator=torch.Generator("cuda").manual_seed(0))).images
    pipe = sd3plugin.optimize(load(), overrides=[f"quant={name}", "backend=eager", "device=cuda",
                                                 "dtype=bfloat16", f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)["quant"]
    expected = DEFAULT_INT8 if "weightonly" not in name else \
        [n for n in quant.linear_modules(pipe.transformer) if n.startswith("transformer_blocks.")]
    assert rep["modules"] == expected and _quantized_names(pipe.transformer) == sorted(expected), rep
    out = pipe(**tiny_call(generator=torch.Generator("cuda").manual_seed(0))).images
    err = compare_latents(ref, out)
    # fp8 e4m3 keeps 3 mantissa bits (~6e-2 per value); the random tiny model measured well below 0.1
    assert err["finite"] and 0 < err["rel_error"] < 0.1, err


# ----------------------------------------------------------------------------------------------------
# per-layer sensitivity -> the seed's JSON form -> selection
# ----------------------------------------------------------------------------------------------------

def test_layer_sensitivity_writes_json_that_selection_reads(tmp_path):
    from sd3plugin.apps.quality import layer_sensitivity, write_submodules_json

    t = _tiny_transformer()
    inputs = random_transformer_inputs(t.config, 64, 64, text_tokens=16)
    with torch.no_grad():
        before = t(**inputs).sample
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_q_proj", "proj_out"]
    metrics = layer_sensitivity(t, "int8_dynamic", inputs, names, progress=False)
    assert list(metrics) == names and all(set(v) == {"ssim", "rel_error"} for v in metrics.values())
    # the last block's text query feeds only the discarded text output: quantizing it changes nothing
    assert metrics["transformer_blocks.1.attn.add_q_proj"] == {"ssim": 1.0, "rel_error": 0.0}
    assert metrics["proj_out"]["rel_error"] > 0 and metrics["proj_out"]["ssim"] < 1
    with torch.no_grad():
        assert torch.equal(t(**inputs).sample, before)  # every layer restored
    assert _quantized_names(t) == []
    with pytest.raises(ValueError, match="not Linear layers of this transformer: pos_embed.proj"):
        layer_sensitivity(t, "int8_dynamic", inputs, ["pos_embed.proj"], progress=False)
    path = write_submodules_json(metrics, tmp_path / "int8.json")
    sel, _, _ = quant.select_modules(t, _qcfg(type="int8_dynamic", submodules_config_path=path,
                                               top_percentage=34))
    assert sel == ["transformer_blocks.1.attn.add_q_proj"]  # the best SSIM first


def test_sensitivity_command(tmp_path, capsys):
    from sd3plugin.apps.quality import main

    out = tmp_path / "tiny_int8.json"
    assert main(["sensitivity", "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "64",
                 "--width", "64", "--layers", "proj_out", "transformer_blocks.0.ff.*", "--out", str(out)]) == 0
    assert sorted(quant.load_submodules_json(out)) == ["proj_out", "transformer_blocks.0.ff.net.0.proj",
                                                       "transformer_blocks.0.ff.net.2"]
    assert "3 layers of tiny (random weights), quant=int8_dynamic" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("name, mode", [("fp8_e4m3_e4m3_dynamic", "max-speed"), ("int8_dynamic", "default")])
def test_quantized_regional_compile_on_gpu(tiny_path, cache_dir, name, mode):
    """Quantize, fuse, compile (CUDA graphs with max-speed): close to eager, no fallback."""
    if name.startswith("fp8") and not _fp8_capable():
        pytest.skip("needs compute capability >= 8.9")
    load = lambda: StableDiffusion3Pipeline.from_pretrained(tiny_path, **{dtype_kwarg(): torch.bfloat16}).to("cuda")
    call = lambda: tiny_call(generator=torch.Generator("cuda").manual_seed(0))
    ref = load()(**call()).images
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(load(), overrides=[f"quant={name}", f"mode={mode}", "backend=inductor",
                                                 "on_error=raise", "device=cuda", f"cache_dir={cache_dir}"])
    out = [pipe(**call()).images for _ in range(3)]  # CUDA graphs record on the first calls, replay after
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "compiled" and rep["fused_qkv"] is True, rep
    assert any(n.endswith("attn.to_qkv") for n in rep["quant"]["modules"])
    for o in out:
        err = compare_latents(ref, o)
        assert err["finite"] and err["rel_error"] < 0.1, err
    assert compare_latents(out[1], out[2])["rel_error"] < 1e-6  # replays are deterministic
