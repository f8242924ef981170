"""fuse_gelu: the feed-forward's first matmul with bias + tanh-GELU in one call (cuBLASLt epilogue on CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd3plugin.kernels import gelu_epilogue


def _gelu_modules(t):
    return [m for m in t.modules() if type(m).__name__ == "GELU"]


@pytest.mark.parametrize("variant", ["tiny", pytest.param("tiny-sd3.5", marks=pytest.mark.slow)])
def test_fuse_gelu_matches_eager_compiled_and_undoes(variant, sd3):
    """Every tanh-GELU projection is routed through the op; the transformer's output is unchanged (fp32 on
    CPU: the same math, 1e-5), also under torch.compile with the op as one opaque call; undo restores."""
    t = sd3.transformer(variant)
    x = sd3.inputs(t)
    with torch.no_grad():
        ref = t(**x).sample
        undo = gelu_epilogue.fuse_gelu(t)
        assert undo.fused == len(_gelu_modules(t)) > 0
        assert all("forward" in m.__dict__ for m in _gelu_modules(t))
        assert sd3.rel(t(**x).sample, ref) < 1e-5
        compiled = torch.compile(t, fullgraph=True)
        assert sd3.rel(compiled(**x).sample, ref) < 1e-5
    undo()
    assert not any("forward" in m.__dict__ for m in _gelu_modules(t))


def test_op_is_tanh_gelu_of_the_linear_and_has_a_fake():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    out = gelu_epilogue.linear_gelu_tanh(x, w, b)
    assert out.shape == (2, 5, 12)
    assert torch.allclose(out, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-6)
    assert not torch.allclose(out, F.gelu(F.linear(x, w, b)), atol=1e-6)  # not the exact (erf) GELU
    torch.library.opcheck(gelu_epilogue.linear_gelu_tanh, (x, w, b))


def test_quantized_projections_keep_their_matmul(sd3):
    """int8 weights (torchao tensor subclasses) cannot go through cuBLASLt's epilogue: left alone."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    t = sd3.transformer("tiny")
    gelus = _gelu_modules(t)
    quantize_(gelus[0].proj, Int8WeightOnlyConfig())
    undo = gelu_epilogue.fuse_gelu(t)
    assert undo.fused == len(gelus) - 1 and "forward" not in gelus[0].__dict__
    undo()


@pytest.mark.gpu
def test_epilogue_on_gpu_matches_matmul_then_gelu(sd3):
    """On CUDA the op is one cuBLASLt call whose tanh-GELU equals matmul + F.gelu(approximate="tanh") within
    fp16 rounding, at SD3-medium's feed-forward shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4096, 1536, device="cuda", dtype=torch.float16, generator=g)
    w = torch.randn(6144, 1536, device="cuda", dtype=torch.float16, generator=g) / 40
    b = torch.randn(6144, device="cuda", dtype=torch.float16, generator=g)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    out = gelu_epilogue.linear_gelu_tanh(x, w, b)
    assert out.dtype == torch.float16 and sd3.rel(out.float(), ref) < 2e-3
