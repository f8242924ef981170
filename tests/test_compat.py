"""The private APIs behind sd3plugin.compat still do what the seams rely on: a new torch or diffusers that
changes one fails here, by name, instead of somewhere deep in an optimized pipeline."""
from __future__ import annotations

import pytest
import torch

from sd3plugin.compat import diffusers as dcompat
from sd3plugin.compat import torch as tcompat


def test_torch_compiled_call_replaces_the_forward():
    m = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    tcompat.set_compiled_call(m, lambda *a, **k: "replaced")
    assert m(x) == "replaced" and tcompat.compiled_call(m) is not None
    assert torch.equal(tcompat.plain_call(m, x), torch.nn.functional.linear(x, m.weight, m.bias))
    tcompat.clear_compiled_call(m)
    assert isinstance(m(x), torch.Tensor)


def test_torch_graph_count_counts_a_compilation():
    torch._dynamo.reset()
    before = tcompat.graph_count()
    torch.compile(lambda t: t * 2 + 1, backend="eager")(torch.ones(3))
    assert tcompat.graph_count() == before + 1


def test_torch_addmm_activation_has_the_gelu_epilogue():
    assert hasattr(torch, "_addmm_activation")
    bias, x, w = torch.zeros(3), torch.randn(2, 4), torch.randn(4, 3)
    out = tcompat.addmm_gelu_tanh(bias, x, w)  # on CPU: exact GELU; on CUDA: the tanh form in cuBLASLt
    ref = torch.nn.functional.gelu(x @ w + bias)
    assert out.shape == (2, 3) and torch.allclose(out, ref, atol=1e-2)


def test_diffusers_names_the_seam_relies_on():
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models import attention_processor

    for name in ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"):
        assert hasattr(attention_processor, name), name
    assert dcompat.attention_class() is attention_processor.Attention
    for attr in ("_hf_peft_config_loaded", "_prepare_lora_hotswap_kwargs", "enable_lora_hotswap",
                 "load_lora_adapter"):
        assert hasattr(PeftAdapterMixin, attr), attr


def test_diffusers_adapter_state_is_read(tiny_path, loras):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    t = pipe.transformer
    assert not dcompat.has_adapters(t) and dcompat.adapter_names(t) == []
    pipe.load_lora_weights(loras["b"], adapter_name="b")
    assert dcompat.has_adapters(t) and dcompat.adapter_names(t) == ["b"]
    assert not dcompat.is_plain_linear(t.transformer_blocks[0].attn.to_q)  # PEFT wrapped it
    pipe.unload_lora_weights()
    assert not dcompat.has_adapters(t) and dcompat.is_plain_linear(t.transformer_blocks[0].attn.to_q)
    t.enable_lora_hotswap(target_rank=8)
    assert dcompat.hotswap_prepared(t)
    dcompat.clear_hotswap(t)
    assert not dcompat.hotswap_prepared(t)


def test_flash_attn_cache_internals():
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed (GPU machines only)")
    from flash_attn.cute import cache_utils

    assert hasattr(cache_utils, "CUTE_DSL_CACHE_DIR") and hasattr(cache_utils, "CUTE_DSL_CACHE_ENABLED")
