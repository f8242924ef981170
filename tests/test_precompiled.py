"""Precompiled transformer blocks in one process (the cache flow across processes is in test_cache_warm.py)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusion3Pipeline

import sd3plugin
from sd3plugin.backends import precompiled
from sd3plugin.compat import precompile as pc

from .conftest import tiny_call

pytestmark = pytest.mark.skipif(not pc.support()[0], reason=f"no precompile here: {pc.support()[1]}")


@pytest.mark.slow
def test_dynamic_shapes_need_one_artefact_per_block_structure_for_every_resolution(tiny_path, cache_dir):
    """dynamic=true: the blocks called at two resolutions give one artefact per structure (SD3's last block
    differs), and those accept a third resolution; their output equals the eager block's."""
    torch._dynamo.reset()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    with precompiled.recording() as samples:
        sd3plugin.optimize(pipe, overrides=["backend=inductor", "dynamic=true", f"cache_dir={cache_dir}"])
        for h, w in [(64, 64), (48, 80)]:
            pipe(**tiny_call(height=h, width=w, num_inference_steps=1))
    rep = sd3plugin.report(pipe)
    assert "warm compiles the blocks itself" in rep["precompiled"]["reason"]
    assert len({s["structure"] for s in samples}) == 2 and len(samples) >= 4  # 2 structures x 2 shapes
    built, errors = precompiled.build(samples, rep["inductor_options"], True, set())
    assert errors == [] and len(built) == 2
    arts = [pc.deserialize(data) for _, data in built]
    with precompiled.recording() as third:  # the inputs of a resolution that was not warmed
        pipe(**tiny_call(height=96, width=32, num_inference_steps=1))
    assert len(third) == 2
    with torch.no_grad():
        for s in third:
            full = (s["block"], *s["args"])
            accepting = [a for a in arts if pc.guard_check(a, full, s["kwargs"])]
            assert len(accepting) == 1  # exactly the artefact of its structure
            got = pc.call(accepting[0], full, s["kwargs"])
            want = s["block"](*s["args"], **s["kwargs"])  # the ordinary compiled block
            for g, w in zip(got, want):  # (context, image); the last block has no context output
                assert (g is None) == (w is None)
                if w is not None:
                    assert ((g - w).abs().max() / w.abs().max()).item() < 1e-4
    sd3plugin.undo(pipe)
