"""SD3AttnProcessor: same numbers as diffusers' processors, fused or not, SD3 and SD3.5; kernel choice."""
from __future__ import annotations

import pytest
import torch

import sd3plugin
from sd3plugin.kernels import attention, fa4
from sd3plugin.compat.diffusers import attention_modules
from sd3plugin.transforms.attention import set_processors
from sd3plugin.transforms.fuse_qkv import FusedProjections
from sd3plugin.models import architecture

TOL = 1e-5  # fp32 on CPU: the same math in another order (one fused matmul instead of three)


@pytest.mark.parametrize("variant", ["tiny", "tiny-sd3.5"])
@pytest.mark.parametrize("fuse", [False, True])
def test_processor_matches_diffusers(variant, fuse, sd3):
    t = sd3.transformer(variant)
    x = sd3.inputs(t)
    keys = set(t.state_dict())
    with torch.no_grad():
        ref = t(**x).sample
        if fuse:
            fp = FusedProjections(t)
            assert fp.fuse() > 0
        undo = set_processors(t, "sdpa").remove
        out = t(**x).sample
    assert sd3.rel(out, ref) < TOL, sd3.rel(out, ref)
    if variant == "tiny-sd3.5":  # the q/k norm really matters here: dropping it moves the output
        assert t.transformer_blocks[0].attn.norm_q is not None
    undo()
    assert all(type(m.processor).__name__ == "JointAttnProcessor2_0"
               for _, m in attention_modules(t))
    if fuse:
        fp.unfuse()
        assert set(t.state_dict()) == keys
    with torch.no_grad():
        assert sd3.rel(t(**x).sample, ref) < TOL


def test_dropping_the_qk_norm_is_detected(sd3):
    """The SD3.5 comparison above can fail: without the q/k norm the output moves well past TOL."""
    t = sd3.transformer("tiny-sd3.5")
    x = sd3.inputs(t)
    with torch.no_grad():
        ref = t(**x).sample
        for _, m in attention_modules(t):
            m.norm_q = m.norm_k = None
            if hasattr(m, "norm_added_q"):
                m.norm_added_q = m.norm_added_k = None
        set_processors(t, "sdpa")
        out = t(**x).sample
    assert sd3.rel(out, ref) > 100 * TOL


def test_kernel_choice_on_cpu():
    kernel, why = attention.resolve_kernel("auto", "cpu", torch.float32)
    assert kernel == "sdpa" and "CPU" in why
    assert attention.resolve_kernel("sdpa", "cpu", torch.float32)[0] == "sdpa"
    with pytest.raises(sd3plugin.ConfigError, match=r"attention=fa4 cannot run: FA4 needs a CUDA GPU.*attention=auto"):
        attention.resolve_kernel("fa4", "cpu", torch.float32)
    with pytest.raises(sd3plugin.ConfigError,
                       match="attention=.flash3. is not valid; choose one of: auto, sdpa, fa4, fa3, fa3_fp8, int8, int8_fp8"):
        sd3plugin.config.compose(None, ["attention=flash3"])


def test_attention_fa4_on_cpu_is_a_config_error_and_loses_nothing(tiny_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    procs = [type(m.processor) for _, m in attention_modules(pipe.transformer)]
    with pytest.raises(sd3plugin.ConfigError, match="attention=fa4"):
        sd3plugin.optimize(pipe, overrides=["attention=fa4", "device=cpu"])
    assert [type(m.processor) for _, m in attention_modules(pipe.transformer)] == procs
    assert not hasattr(pipe.transformer.transformer_blocks[0].attn, "to_qkv")
    assert sd3plugin.report(pipe) == {"optimized": False}


@pytest.mark.gpu
def test_fa4_matches_sdpa_on_gpu(sd3):
    if attention.fa4_unavailable("cuda", torch.float16):
        pytest.skip(attention.fa4_unavailable("cuda", torch.float16))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4429, 24, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    ref = attention._attend("sdpa", q, k, v)
    out = attention.fa4_attention(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sd3.rel(out.float(), ref.float()) < 2e-3
    compiled = torch.compile(lambda a, b, c: attention.fa4_attention(a, b, c) * 2)
    assert sd3.rel(compiled(q, k, v).float(), 2 * ref.float()) < 2e-3


def test_other_processors_are_left_in_place(sd3):
    """A processor sd3plugin does not reproduce (IP-Adapter's, a user's own) keeps running, with its inputs."""
    t = sd3.transformer("tiny")

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
            return JointAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states)

    from diffusers.models.attention_processor import JointAttnProcessor2_0

    custom = Custom()
    t.transformer_blocks[1].attn.set_processor(custom)
    FusedProjections(t).fuse()
    handle = set_processors(t, "sdpa")
    undo = handle.remove
    assert handle.report["modules"] == 1
    assert t.transformer_blocks[1].attn.processor is custom
    assert isinstance(t.transformer_blocks[0].attn.processor, attention.SD3AttnProcessor)
    undo()
    assert t.transformer_blocks[1].attn.processor is custom
    assert type(t.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"


def test_fa4_cache_follows_cache_dir_after_import(tmp_path, monkeypatch):
    """flash-attn-4 fixes its kernel-cache folders at import; a second pipeline optimized in the same process
    with another cache_dir (the benchmark's variants, whose first cache_dir is deleted) must get its own.
    Stand-in modules with FA4's layout: the flags re-point every persistent cache, restore() undoes them."""
    import sys
    import types
    from pathlib import Path

    from sd3plugin.global_settings import GLOBAL_SETTINGS

    first = tmp_path / "first"
    utils = types.ModuleType("flash_attn.cute.cache_utils")
    utils.CUTE_DSL_CACHE_ENABLED, utils.CUTE_DSL_CACHE_DIR = True, str(first)
    iface = types.ModuleType("flash_attn.cute.interface")

    def kernel():
        pass

    kernel.compile_cache = types.SimpleNamespace(cache_path=first / "fp123" / "fwd")
    iface._flash_attn_fwd = kernel
    iface.in_memory = types.SimpleNamespace(compile_cache=object())  # a cache without a folder: left alone
    for name, mod in {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.cute": types.ModuleType("x"),
                      "flash_attn.cute.cache_utils": utils, "flash_attn.cute.interface": iface}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["flash_attn"].cute = sys.modules["flash_attn.cute"]
    sys.modules["flash_attn.cute"].cache_utils, sys.modules["flash_attn.cute"].interface = utils, iface

    second = tmp_path / "second"
    flags = fa4.fa4_cache_flags(str(second))
    assert flags == {"flash_attn.cute.cache_utils:CUTE_DSL_CACHE_DIR": str(second),
                     "flash_attn.cute.interface:_flash_attn_fwd.compile_cache.cache_path": second / "fp123" / "fwd"}
    assert (second / "fp123" / "fwd").is_dir()
    try:
        for flag, value in flags.items():
            GLOBAL_SETTINGS.set_flag(flag, value)
        assert kernel.compile_cache.cache_path == second / "fp123" / "fwd"
        assert fa4.fa4_cache_dir() == str(second)
    finally:
        GLOBAL_SETTINGS.restore()
    assert kernel.compile_cache.cache_path == Path(first / "fp123" / "fwd") and utils.CUTE_DSL_CACHE_DIR == str(first)
    utils.CUTE_DSL_CACHE_ENABLED = False  # kernels kept in memory only: nothing to point anywhere
    assert fa4.fa4_cache_flags(str(second)) == {}
