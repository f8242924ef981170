"""sd3plugin.joint_attention: projections + attention + output projections as one op, no copies."""
from __future__ import annotations

import pytest
import torch

from sd3plugin.kernels import attention, joint_attention
from sd3plugin.compat.diffusers import attention_modules
from sd3plugin.transforms.fuse_qkv import FusedProjections


TOL = 1e-5  # fp32 on CPU: the same math in another order


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_joint_op_matches_diffusers_eager_and_compiled(monkeypatch, sd3):
    """SD3 (no q/k norm): every joint attention runs as the op, the last block (no context output
    projection) included; the transformer's output equals diffusers' within fp32 reordering (1e-5), also
    under torch.compile with the op as one opaque call."""
    t = sd3.transformer("tiny")
    x = sd3.inputs(t)
    calls = []
    real = joint_attention.run
    monkeypatch.setattr(joint_attention, "run", lambda *a: calls.append(a[0]) or real(*a))
    with torch.no_grad():
        ref = t(**x).sample
        FusedProjections(t).fuse()
        for _, m in attention_modules(t):
            m.set_processor(attention.SD3AttnProcessor("sdpa", joint=True))
        out = t(**x).sample
        assert len(calls) == len(t.transformer_blocks) == attention.joint_op_modules(t)
        assert calls[-1].context_pre_only and not calls[0].context_pre_only
        assert sd3.rel(out, ref) < TOL, sd3.rel(out, ref)
        compiled = torch.compile(t, fullgraph=True)
        assert sd3.rel(compiled(**x).sample, ref) < TOL

    # dynamic shapes, compiled per block as sd3plugin does: the op's fake takes symbolic token counts, so a
    # new image size compiles nothing new (without the call counter: its list would be guarded on)
    monkeypatch.undo()
    block = t.transformer_blocks[0]
    dim = t.config.num_attention_heads * t.config.attention_head_dim
    g = torch.Generator().manual_seed(2)
    c, temb = torch.randn(2, 7, dim, generator=g), torch.randn(2, dim, generator=g)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dyn = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for n in (64, 48, 32):
            img = torch.randn(2, n, dim, generator=g)
            ctx_out, img_out = dyn(img, c, temb)
            ref_ctx, ref_img = block(img, c, temb)
            assert sd3.rel(img_out, ref_img) < TOL and sd3.rel(ctx_out, ref_ctx) < TOL
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_joint_op_is_not_used_where_it_does_not_apply(sd3):
    """SD3.5's q/k norm, projections that are not fused: the ordinary path (same numbers as diffusers)."""
    t = sd3.transformer("tiny-sd3.5")
    x = sd3.inputs(t)
    with torch.no_grad():
        ref = t(**x).sample
        attn = t.transformer_blocks[0].attn
        assert not joint_attention.applies(attn, torch.zeros(1))  # q/k norm
        FusedProjections(t).fuse()
        for _, m in attention_modules(t):
            m.set_processor(attention.SD3AttnProcessor("sdpa", joint=True))
        assert sd3.rel(t(**x).sample, ref) < TOL
        assert attention.joint_op_modules(t) == 0
    plain = sd3.transformer("tiny").transformer_blocks[0].attn
    assert not joint_attention.applies(plain, torch.zeros(1))  # projections not fused yet
    assert attention.SD3AttnProcessor("fa4").joint and not attention.SD3AttnProcessor("sdpa").joint


@pytest.mark.parametrize("context_out", [True, False])
def test_joint_op_schema_and_fake(context_out):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = (r(2, 6, 8), r(2, 3, 5), r(12, 8), r(12), r(12, 5), r(12), r(8, 4), r(8),
            r(5, 4) if context_out else None, r(5) if context_out else None, 2)
    img, ctx = joint_attention.joint_attention(*args)
    assert img.shape == (2, 6, 8) and ctx.shape == ((2, 3, 5) if context_out else (2, 3, 4))
    torch.library.opcheck(joint_attention.joint_attention, args)


@pytest.mark.gpu
def test_joint_op_with_fa4_on_gpu(sd3):
    """SD3-medium's first block at 1024x1024 in fp16: the op (FA4 on strided Q/K/V views) equals the
    ordinary FA4 path within fp16 rounding."""
    if attention.fa4_unavailable("cuda", torch.float16):
        pytest.skip(attention.fa4_unavailable("cuda", torch.float16))
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=1536, cross_attention_dim=None, added_kv_proj_dim=1536, dim_head=64, heads=24,
                     out_dim=1536, context_pre_only=False, bias=True).cuda().half()
    FusedProjections(attn).fuse()
    x = torch.randn(2, 4096, 1536, device="cuda", dtype=torch.float16)
    c = torch.randn(2, 333, 1536, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref_img, ref_ctx = attention.SD3AttnProcessor("fa4", joint=False)(attn, x, c)
        img, ctx = attention.SD3AttnProcessor("fa4")(attn, x, c)
    assert sd3.rel(img.float(), ref_img.float()) < 2e-3 and sd3.rel(ctx.float(), ref_ctx.float()) < 2e-3
