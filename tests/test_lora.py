"""LoRA, adapters, save and undo on an optimized pipeline: the same images as plain diffusers, or a clear
error. Tiny SD3 in fp32 on CPU: every comparison is to plain diffusers doing the same calls on the same
weights, within TOL (fp32 reordering: fused matmuls, other kernels)."""
from __future__ import annotations

import pytest
import torch

import sd3plugin
from sd3plugin.kernels import attention, gelu_epilogue
from sd3plugin.backends.inductor import InductorBackend

from .conftest import tiny_call

TOL = 2e-5


def _load(path, **kw):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, **kw)


def _latents(pipe, **kw):
    torch.manual_seed(0)  # the ControlNet pipeline samples its control latents from the global generator
    return pipe(**tiny_call(num_inference_steps=2, **kw)).images


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def no_compile(monkeypatch):
    """The whole stack (fused projections, processors, guarded forward) without inductor's minutes on CPU."""
    monkeypatch.setattr(InductorBackend, "compile", lambda self, t, plan: {"compiled_modules": ["transformer_blocks.0"]})


def _both(plain, opt, fn):
    fn(plain)
    fn(opt)


STEPS = [
    ("load a", lambda p, L: p.load_lora_weights(L["a"], adapter_name="a")),
    ("load b", lambda p, L: p.load_lora_weights(L["b"], adapter_name="b")),
    ("set_adapters", lambda p, L: p.set_adapters(["a", "b"], [0.3, 0.7])),
    ("fuse_lora", lambda p, L: p.fuse_lora()),
    ("unfuse_lora", lambda p, L: p.unfuse_lora()),
    ("delete b", lambda p, L: p.delete_adapters("b")),
    ("disable", lambda p, L: p.disable_lora()),
    ("enable", lambda p, L: p.enable_lora()),
    ("fuse + unload (baked)", lambda p, L: (p.fuse_lora(), p.unload_lora_weights())),
    ("load b again", lambda p, L: p.load_lora_weights(L["b"], adapter_name="b")),
    ("unload", lambda p, L: p.unload_lora_weights()),
]


@pytest.mark.parametrize("kernels", ["default", "joint-op+gelu-epilogue"])
def test_every_lora_call_gives_what_diffusers_gives(tiny_path, loras, no_compile, kernels):
    plain = _load(tiny_path)
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu"])
    rep = sd3plugin.report(opt)
    assert rep["fused_qkv"] and rep["status"] == "compiled"
    if kernels != "default":  # what runs on CUDA with FA4: the joint op (SDPA on CPU) and the GELU epilogue
        for _, m in attention.dcompat.attention_modules(opt.transformer):
            m.processor.joint = True
        assert gelu_epilogue.fuse_gelu(opt.transformer).fused > 0
        assert attention.joint_op_modules(opt.transformer) == len(opt.transformer.transformer_blocks)
    assert _diff(_latents(plain), _latents(opt)) < TOL
    for name, step in STEPS:
        _both(plain, opt, lambda p: step(p, loras))
        ref, out = _latents(plain), _latents(opt)
        assert _diff(ref, out) < TOL, (name, _diff(ref, out))
    # the LoRAs did change the image: this comparison can fail
    assert _diff(_latents(plain), _latents(_load(tiny_path))) > 100 * TOL


def test_a_lora_loaded_before_optimizing_is_kept(tiny_path, loras, no_compile):
    plain, opt = _load(tiny_path), _load(tiny_path)
    _both(plain, opt, lambda p: p.load_lora_weights(loras["a"], adapter_name="a"))
    sd3plugin.optimize(opt, overrides=["backend=inductor", "device=cpu"])
    assert _diff(_latents(plain), _latents(opt)) < TOL
    _both(plain, opt, lambda p: p.unload_lora_weights())
    assert _diff(_latents(plain), _latents(opt)) < TOL


def test_dtype_change_and_moves_rebuild_the_fused_weights(tiny_path, loras, no_compile):
    """pipe.to(dtype) gives every projection its own tensor: the fused weight is rebuilt from them, so a
    LoRA baked in afterwards still reaches the fused path."""
    plain = _load(tiny_path)
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu"])
    _both(plain, opt, lambda p: p.to(torch.float64))
    assert _diff(_latents(plain), _latents(opt)) < TOL
    assert sd3plugin.report(opt)["fused_qkv_state"]["rebuilt_total"] > 0
    _both(plain, opt, lambda p: (p.load_lora_weights(loras["b"]), p.fuse_lora(safe_fusing=True),
                                 p.unload_lora_weights()))
    ref, out = _latents(plain), _latents(opt)
    assert _diff(ref, out) < TOL and _diff(ref, _latents(_load(tiny_path).to(torch.float64))) > 100 * TOL


def test_quantized_layers_refuse_a_lora_and_nothing_changes(tiny_path, loras, no_compile):
    pytest.importorskip("torchao")
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu", "quant=int8_dynamic"])
    assert sd3plugin.report(opt)["quant"]["modules"]
    before = _latents(opt)
    with pytest.raises(sd3plugin.ConfigError, match=r"quant=int8_dynamic quantized.*quant.exclude.*quant=none"):
        opt.load_lora_weights(loras["a"], adapter_name="a")
    assert not getattr(opt.transformer, "peft_config", None)
    assert _diff(before, _latents(opt)) == 0
    # a LoRA on layers left in high precision is fine (the text stream is not quantized by default)
    plain = _load(tiny_path)
    ctx_only = {k: v for k, v in _lora_sd(loras["a"]).items() if ".ff_context." in k}
    opt.load_lora_weights(ctx_only, adapter_name="c")
    assert getattr(opt.transformer, "peft_config", None)


def _lora_sd(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/pytorch_lora_weights.safetensors")


def test_quantizing_a_transformer_with_adapters_is_refused(tiny_path, loras):
    pytest.importorskip("torchao")
    pipe = _load(tiny_path)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    with pytest.raises(sd3plugin.ConfigError, match=r"quant=int8_dynamic cannot quantize .* LoRA adapters loaded \(a\)"):
        sd3plugin.optimize(pipe, overrides=["backend=inductor", "device=cpu", "quant=int8_dynamic"])
    assert sd3plugin.report(pipe) == {"optimized": False}
    assert not hasattr(pipe.transformer.transformer_blocks[0].attn, "to_qkv")


def test_undo_gives_back_the_transformer_and_save_works(tiny_path, tmp_path, no_compile):
    import os

    pipe = _load(tiny_path)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    procs = {k: type(v).__name__ for k, v in pipe.transformer.attn_processors.items()}
    vae_fmt = pipe.vae.decoder.conv_in.weight.is_contiguous()
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    sd3plugin.optimize(pipe, overrides=["backend=inductor", "device=cpu", "memory_format=channels_last"])
    assert not pipe.vae.decoder.conv_in.weight.is_contiguous()
    assert set(pipe.transformer.state_dict()) == set(before)  # the fused modules stay out of the state dict
    pipe.save_pretrained(tmp_path / "optimized")
    sd3plugin.undo(pipe)
    after = pipe.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(hasattr(m, "to_qkv") for m in pipe.transformer.modules())
    assert {k: type(v).__name__ for k, v in pipe.transformer.attn_processors.items()} == procs
    assert pipe.vae.decoder.conv_in.weight.is_contiguous() == vae_fmt
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == env
    assert "forward" not in pipe.transformer.__dict__ and sd3plugin.report(pipe) == {"optimized": False}
    pipe.save_pretrained(tmp_path / "undone")
    for folder in ("optimized", "undone"):
        again = _load(tmp_path / folder)
        assert all(torch.equal(again.transformer.state_dict()[k], before[k]) for k in before)


def test_enabled_nests(tiny_path):
    with sd3plugin.enabled(overrides=["backend=eager", "seed=1"]):
        with sd3plugin.enabled(overrides=["backend=eager", "seed=2"]):
            assert sd3plugin.report(_load(tiny_path))["config"]["seed"] == 2
        assert sd3plugin.is_enabled()
        assert sd3plugin.report(_load(tiny_path))["config"]["seed"] == 1
    assert not sd3plugin.is_enabled()


def test_replacing_the_transformer_is_reported(tiny_path, no_compile):
    from diffusers import SD3Transformer2DModel

    pipe = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu"])
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    rep = sd3plugin.report(pipe)
    assert rep["optimized"] is False and "replaced" in rep["note"]
    assert _diff(_latents(pipe), _latents(_load(tiny_path))) < TOL


def test_controlnet_pipeline_matches_diffusers(tiny_path, tmp_path, no_compile):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from sd3plugin.models import architecture

    torch.manual_seed(4)
    cn = SD3ControlNetModel(**{**architecture("tiny").transformer, "num_layers": 1})
    for p in cn.parameters():  # the output layers start at zero: make them count
        p.data.normal_(0, 0.05)
    cn.save_pretrained(tmp_path / "cn")
    image = torch.rand(1, 3, 64, 64)

    def load():
        return StableDiffusion3ControlNetPipeline.from_pretrained(
            tiny_path, controlnet=SD3ControlNetModel.from_pretrained(tmp_path / "cn"))

    plain = load()
    with sd3plugin.enabled(overrides=["backend=inductor", "device=cpu"]):
        opt = load()
    assert sd3plugin.report(opt)["fused_qkv"]
    kw = dict(control_image=image, controlnet_conditioning_scale=0.8)
    ref = _latents(plain, **kw)
    assert _diff(ref, _latents(opt, **kw)) < TOL
    assert _diff(ref, _latents(plain, control_image=image, controlnet_conditioning_scale=0.0)) > 100 * TOL


@pytest.mark.slow
def test_hotswap_switches_loras_without_recompiling(tiny_path, loras):
    """Compiled for real: after the first LoRA, swapping another in compiles nothing new."""
    plain = _load(tiny_path)
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu",
                                                            "lora_hotswap_rank=8"])
    _latents(opt)
    _both(plain, opt, lambda p: p.load_lora_weights(loras["a"], adapter_name="x"))
    assert _diff(_latents(plain), _latents(opt)) < TOL
    first = sd3plugin.report(opt)["recompilations"]
    plain.unload_lora_weights()
    plain.load_lora_weights(loras["a2"], adapter_name="x")
    opt.load_lora_weights(loras["a2"], adapter_name="x", hotswap=True)
    assert _diff(_latents(plain), _latents(opt)) < TOL
    rep = sd3plugin.report(opt)
    assert rep["recompilations"] == first and rep["lora"]["hotswap_rank"] == 8
    assert rep["lora"]["adapters"] == ["x"]


# -- on the GPU: FA4 + the joint op + the GELU epilogue, CUDA graphs, offload, fp8 ------------------------
def _gpu_pair(tiny_path, overrides):
    plain = _load(tiny_path, torch_dtype=torch.float16).to("cuda")
    opt = sd3plugin.optimize(_load(tiny_path, torch_dtype=torch.float16).to("cuda"),
                             overrides=["backend=inductor", "device=cuda", *overrides])
    return plain, opt


def _gpu_latents(pipe):
    torch.manual_seed(0)
    return pipe(**tiny_call(num_inference_steps=2, generator=torch.Generator("cuda").manual_seed(0))).images.float()


GPU_TOL = 2e-2  # fp16 through other kernels (FA4, fused matmuls, the GELU epilogue)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "max-speed"])
def test_lora_on_gpu_with_fa4_joint_op_gelu_and_cuda_graphs(tiny_path, loras, mode):
    plain, opt = _gpu_pair(tiny_path, [f"mode={mode}"])
    rep = sd3plugin.report(opt)
    assert rep["status"] == "compiled"
    base = _diff(_gpu_latents(plain), _gpu_latents(opt))
    assert base < GPU_TOL
    for name, step in STEPS[:4] + STEPS[8:]:
        _both(plain, opt, lambda p: step(p, loras))
        ref, out = _gpu_latents(plain), _gpu_latents(opt)
        assert _diff(ref, out) < GPU_TOL, (name, _diff(ref, out))
    if mode == "max-speed":
        assert sd3plugin.report(opt).get("cuda_graphs")


@pytest.mark.gpu
def test_offload_and_moves_on_gpu(tiny_path, loras):
    plain, opt = _gpu_pair(tiny_path, ["mode=max-speed"])
    _gpu_latents(opt)
    _both(plain, opt, lambda p: p.enable_model_cpu_offload())
    assert _diff(_gpu_latents(plain), _gpu_latents(opt)) < GPU_TOL
    _both(plain, opt, lambda p: p.load_lora_weights(loras["b"]))
    assert _diff(_gpu_latents(plain), _gpu_latents(opt)) < GPU_TOL


@pytest.mark.gpu
def test_fp8_refuses_a_lora_on_quantized_layers(tiny_path, loras):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    pipe = sd3plugin.optimize(_load(tiny_path, torch_dtype=torch.bfloat16).to("cuda"),
                              overrides=["backend=inductor", "device=cuda", "quant=fp8_e4m3_e4m3_dynamic"])
    before = _gpu_latents(pipe)
    with pytest.raises(sd3plugin.ConfigError, match="quant=fp8_e4m3_e4m3_dynamic quantized"):
        pipe.load_lora_weights(loras["a"])
    assert torch.equal(before, _gpu_latents(pipe))


def test_a_cuda_graph_runner_consults_the_guard_before_every_call(tiny_path, loras, monkeypatch):
    """A replayed graph never reaches forward(): the runner must call the guard itself (CPU: plain calls)."""
    from sd3plugin.backends import cudagraph
    from sd3plugin.transforms import compile as compile_transform

    monkeypatch.setattr(InductorBackend, "compile", lambda self, t, plan: (
        cudagraph.install(t), {"compiled_modules": ["transformer_blocks.0"], "cuda_graphs": "test"})[1])
    seen = []
    real = compile_transform.GuardedForward.before_call
    monkeypatch.setattr(compile_transform.GuardedForward, "before_call", lambda self: (seen.append(1), real(self)))
    plain = _load(tiny_path)
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu"])
    runner = cudagraph.runner_of(opt.transformer)
    assert runner is not None and runner.before is not None
    _both(plain, opt, lambda p: p.load_lora_weights(loras["a"]))  # the runner is hidden while PEFT loads
    assert cudagraph.runner_of(opt.transformer) is runner
    assert _diff(_latents(plain), _latents(opt)) < TOL
    assert len(seen) >= 2 and runner.suspended and "LoRA" in runner.suspended
    _both(plain, opt, lambda p: p.unload_lora_weights())
    _latents(opt)
    assert runner.suspended is None


def _ip_adapter_state(t) -> dict:
    """A random SD3 IP-Adapter in the layout diffusers' loader takes (image projection + one processor a layer)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(7)
    c = t.config
    hidden = c.attention_head_dim * c.num_attention_heads
    procs = {}
    for i in range(len(t.attn_processors)):
        p = SD3IPAdapterJointAttnProcessor2_0(hidden_size=hidden, ip_hidden_states_dim=hidden,
                                              head_dim=c.attention_head_dim, timesteps_emb_dim=64)
        procs.update({f"{i}.{k}": torch.randn_like(v) * 0.1 for k, v in p.state_dict().items()})
    proj = IPAdapterTimeImageProjection(embed_dim=16, output_dim=hidden, hidden_dim=64, heads=1, num_queries=4,
                                        timestep_in_dim=32)
    return {"image_proj": {k: torch.randn_like(v) * 0.1 for k, v in proj.state_dict().items()}, "ip_adapter": procs}


def test_ip_adapter_on_an_optimized_pipeline_matches_diffusers(tiny_path, no_compile):
    """diffusers' IP-Adapter processors replace sd3plugin's; image embeddings given directly (no image
    encoder weights here): the same latents as plain diffusers, and the adapter changes them."""
    plain = _load(tiny_path)
    opt = sd3plugin.optimize(_load(tiny_path), overrides=["backend=inductor", "device=cpu"])
    state = _ip_adapter_state(plain.transformer)
    _both(plain, opt, lambda p: p.transformer._load_ip_adapter_weights(state))  # what load_ip_adapter calls
    emb = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(ip_adapter_image_embeds=torch.cat([torch.zeros_like(emb), emb]))
    ref = _latents(plain, **kw)
    assert _diff(ref, _latents(opt, **kw)) < TOL
    assert _diff(ref, _latents(_load(tiny_path))) > 100 * TOL
