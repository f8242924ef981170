"""``fp8_fused_activation`` (sd3plugin/kernels/fp8_block.py): the blocks' norm + modulation and GELU feed
torchao's per-row fp8 matmuls with e4m3 rows they quantized themselves. On CPU torchao's fp8 preset is
applied with its hardware check bypassed (torch._scaled_mm runs on CPU); the quantizing ops run their torch
reference in-process and the Triton kernels in Triton's interpreter (a fresh process, slow)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from sd3plugin.config import compose
from sd3plugin.errors import ConfigError
from sd3plugin.kernels import fp8_block
from sd3plugin.plan import make_plan
from sd3plugin.transforms import fp8_activation
from sd3plugin.transforms.base import Run

pytest.importorskip("torchao")


def _quantized_tiny():
    """The tiny transformer in bf16 with fused Q/K/V, sd3plugin's processor (sdpa) and torchao's per-row fp8
    preset on its default layers; its inputs."""
    import torchao.quantization.quant_api as qa
    from diffusers import SD3Transformer2DModel

    from sd3plugin import quant
    from sd3plugin.kernels.attention import SD3AttnProcessor
    from sd3plugin.models import architecture
    from sd3plugin.transforms.fuse_qkv import FusedProjections

    torch.manual_seed(0)
    t = SD3Transformer2DModel(**architecture("tiny").transformer).eval().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    c = t.config
    inputs = dict(hidden_states=torch.randn(2, c.in_channels, 16, 16, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=g).bfloat16(),
                  pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g).bfloat16(),
                  timestep=torch.tensor([500.0, 20.0]))
    with torch.no_grad():
        plain = t(**inputs, return_dict=False)[0].float()
    FusedProjections(t).fuse()
    proc = SD3AttnProcessor("sdpa")
    for _, m in t.named_modules():
        if type(m).__name__ == "Attention":
            m.set_processor(proc)
    check = qa._check_hardware_support
    qa._check_hardware_support = lambda *a: None  # torchao's fp8 check wants an sm_89+ GPU
    try:
        qcfg = OmegaConf.merge(compose(overrides=["device=cpu"]).quant, {"type": "fp8_e4m3_e4m3_dynamic"})
        orig = quant.check_device
        quant.check_device = lambda *a: None
        try:
            quant.quantize(t, qcfg, "cuda")
        finally:
            quant.check_device = orig
    finally:
        qa._check_hardware_support = check
    return t, inputs, plain


def _run(t, inputs):
    with torch.no_grad():
        return t(**inputs, return_dict=False)[0].float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fused_blocks_match_the_torchao_preset_and_undo_restores_it_exactly():
    """Both blocks run the fused forward on every Q/K/V and feed-forward layer torchao quantized. Output
    within 1% (relative L2) of torchao's preset (measured 0.45%) and no farther from the unquantized bf16
    model than torchao's (+25%; measured 0.56% vs 0.58%): the same per-row e4m3 scaling, quantized from
    float32 instead of the bf16-rounded activation. Undo: byte-identical to the preset again, no buffers
    or forward left on the modules."""
    from sd3plugin.compat import torchao as aocompat

    t, inputs, plain = _quantized_tiny()
    before = _run(t, inputs)
    keys = set(t.state_dict())
    w = aocompat.rowwise_fp8_weight(t.transformer_blocks[0].attn.to_qkv.weight)
    assert w is not None and w.qdata.dtype == torch.float8_e4m3fn and w.scale.shape == (w.qdata.shape[0], 1)
    assert aocompat.rowwise_fp8_weight(t.transformer_blocks[0].attn.to_add_out.weight) is None  # not quantized
    done = fp8_block.install(t)
    assert len(done.blocks) == 2 and not done.skipped
    assert len(done.linears) == 12  # per block: to_qkv, to_q/k/v (run when unfused), ff.net.0.proj, ff.net.2
    fused = _run(t, inputs)
    assert _rel(fused, before) < 1e-2, _rel(fused, before)
    assert _rel(fused, plain) <= 1.25 * _rel(before, plain), (_rel(fused, plain), _rel(before, plain))
    assert set(t.state_dict()) == keys  # the fp8 references are not persistent
    done()
    assert torch.equal(_run(t, inputs), before)
    assert not any(n.endswith((fp8_block.W8, fp8_block.WS)) for n, _ in t.named_buffers())
    assert all("forward" not in b.__dict__ for b in t.transformer_blocks)


def test_fused_forward_feeds_the_fp8_ops(monkeypatch):
    """Each block quantizes three activations itself (norm1, norm2 + modulation, GELU); the text stream's
    layers are not quantized by default, so its activations stay 16-bit."""
    t, inputs, _ = _quantized_tiny()
    calls = []
    ops = torch.ops.sd3plugin
    norm, gelu = ops.fp8_norm_modulate_quantize, ops.fp8_gelu_quantize

    class Spy:
        def __getattr__(self, name):
            op = {"fp8_norm_modulate_quantize": norm, "fp8_gelu_quantize": gelu}[name]
            return lambda *a: (calls.append((name, tuple(a[0].shape))), op(*a))[1]

    monkeypatch.setattr(fp8_block.torch.ops, "sd3plugin", Spy())
    fp8_block.install(t)
    _run(t, inputs)
    names = [c[0] for c in calls]
    assert names.count("fp8_norm_modulate_quantize") == 4 and names.count("fp8_gelu_quantize") == 2, calls
    assert all(shape[-2] == 64 for name, shape in calls if name == "fp8_norm_modulate_quantize")  # image tokens


def test_key_off_changes_nothing():
    """fp8_fused_activation defaults to false: the transform installs nothing and the processor's output on
    16-bit activations is byte-identical before and after."""
    cfg = compose(overrides=["device=cpu"])
    assert cfg.fp8_fused_activation is False
    t, inputs, _ = _quantized_tiny()
    before = _run(t, inputs)
    run = Run(target=t, transformer=t, plan=make_plan(cfg), report={})
    assert fp8_activation.apply(run) is None
    assert all("forward" not in b.__dict__ for b in t.transformer_blocks)
    assert torch.equal(_run(t, inputs), before)


@pytest.mark.parametrize("overrides, message", [
    (["quant=none"], "fp8_fused_activation=true quantizes activations for per-row fp8 matmuls, but quant=none; "
                     "set quant=fp8_e4m3_e4m3_dynamic, or fp8_fused_activation=false"),
    (["quant=fp8_e4m3_e4m3_dynamic_per_tensor"], "but quant=fp8_e4m3_e4m3_dynamic_per_tensor"),
    (["quant=fp8_e4m3_e4m3_dynamic", "backend=eager"], "not with backend=eager; use backend=inductor"),
    (["quant=fp8_e4m3_e4m3_dynamic", "lora_hotswap_rank=8"], "unset lora_hotswap_rank"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides=["fp8_fused_activation=true", "device=cuda", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_transform_refuses_without_cuda_and_on_unquantized_blocks(monkeypatch):
    t, _, _ = _quantized_tiny()
    cfg = compose(overrides=["device=cpu"])
    plan = make_plan(cfg)
    plan.fp8_fused_activation = True
    with pytest.raises(ConfigError, match="runs Triton kernels on a CUDA GPU .this run is on CPU.; or set "
                                          "fp8_fused_activation=false"):
        fp8_activation.apply(Run(target=t, transformer=t, plan=plan, report={}))
    monkeypatch.setattr(fp8_activation, "unavailable", lambda device: None)
    from diffusers import SD3Transformer2DModel

    from sd3plugin.models import architecture

    plain = SD3Transformer2DModel(**architecture("tiny").transformer)
    with pytest.raises(ConfigError, match="needs sd3plugin's attention processor"):
        fp8_activation.apply(Run(target=plain, transformer=plain, plan=plan, report={}))
    from sd3plugin.transforms.attention import set_processors

    set_processors(plain, "sdpa")
    with pytest.raises(ConfigError, match="applies to no transformer block .none of its linear layers has "
                                          "torchao's per-row fp8 weight."):
        fp8_activation.apply(Run(target=plain, transformer=plain, plan=plan, report={}))
    report = {}
    h = fp8_activation.apply(Run(target=t, transformer=t, plan=plan, report=report))
    assert report["fp8_fused_activation"]["blocks"] == 2 and h.name == "fp8_fused_activation"
    h.remove()
    assert all("forward" not in b.__dict__ for b in t.transformer_blocks)


def test_sd35_dual_attention_blocks_keep_their_forward():
    from diffusers import SD3Transformer2DModel

    from sd3plugin.models import architecture

    t = SD3Transformer2DModel(**architecture("tiny-sd3.5").transformer)
    reasons = {fp8_block.block_applies(b) for b in t.transformer_blocks}
    assert "SD3.5's second attention (use_dual_attention)" in reasons


_INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_fp8_fused_activation import _quantized_tiny, _run, _rel
from sd3plugin.kernels import fp8_block
t, inputs, plain = _quantized_tiny()
before = _run(t, inputs)
fp8_block.install(t)
fused = _run(t, inputs)
print(json.dumps({{"fused_vs_torchao": _rel(fused, before), "fused_vs_bf16": _rel(fused, plain),
                  "torchao_vs_bf16": _rel(before, plain)}}))
"""


@pytest.mark.slow
def test_fused_blocks_with_the_triton_kernels_in_the_interpreter():
    """The same comparison with the Triton kernels themselves (Triton's CPU interpreter, a fresh process):
    the same tolerances as the in-process test."""
    pytest.importorskip("triton")
    here = pathlib.Path(__file__).resolve()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = _INTERPRETED.format(root=str(here.parents[1]), tests=str(here.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["fused_vs_torchao"] < 1e-2 and r["fused_vs_bf16"] <= 1.25 * r["torchao_vs_bf16"], r


@pytest.mark.slow
def test_compiled_fused_block_is_one_graph_and_matches_eager():
    """Regional compile sees the fused block whole: one graph, no graph break (the quantizing kernels are
    custom ops), and the compiled block within bf16 rounding of the eager one."""
    t, _, _ = _quantized_tiny()
    fp8_block.install(t)
    b = t.transformer_blocks[0]
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 64, 32, generator=g).bfloat16(), torch.randn(2, 7, 32, generator=g).bfloat16(),
            torch.randn(2, 32, generator=g).bfloat16())
    torch._dynamo.reset()
    with torch.no_grad():
        eager = b(*args)
        ex = torch._dynamo.explain(b)(*args)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
        compiled = torch.compile(b, backend="inductor")(*args)
    for c, e in zip(compiled, eager):
        assert _rel(c.float(), e.float()) < 2e-2
