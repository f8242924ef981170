"""The cache-dit seam on the tiny model: a zero threshold reuses nothing (exact), a loose one reuses
steps, disable() gives back plain diffusers' latents."""
import pytest
import torch

from .conftest import tiny_call
from sd3plugin.compat import cache_dit as seam

pytestmark = pytest.mark.skipif(not seam.available(), reason="cache-dit not installed (extra 'cache')")


def test_zero_threshold_exact_loose_reuses_and_disable_restores(tiny_pipe):
    plain = tiny_pipe(**tiny_call(num_inference_steps=8)).images
    seam.enable(tiny_pipe, seam.StepCacheSettings(fn=1, bn=0, threshold=0.0, warmup=0))
    exact = tiny_pipe(**tiny_call(num_inference_steps=8)).images
    assert seam.cached_steps(tiny_pipe) == []
    torch.testing.assert_close(exact, plain, rtol=0, atol=0)
    seam.disable(tiny_pipe)
    seam.enable(tiny_pipe, seam.StepCacheSettings(fn=1, bn=0, threshold=1e9, warmup=2))
    tiny_pipe(**tiny_call(num_inference_steps=8))
    assert len(seam.cached_steps(tiny_pipe)) > 0
    seam.disable(tiny_pipe)
    torch.testing.assert_close(tiny_pipe(**tiny_call(num_inference_steps=8)).images, plain, rtol=0, atol=0)


def test_taylorseer_reuses_and_disable_restores(tiny_pipe):
    plain = tiny_pipe(**tiny_call(num_inference_steps=8)).images
    seam.enable(tiny_pipe, seam.StepCacheSettings(fn=1, threshold=1e9, warmup=2, taylorseer_order=1, bn=1))
    tiny_pipe(**tiny_call(num_inference_steps=8))
    assert len(seam.cached_steps(tiny_pipe)) > 0
    seam.disable(tiny_pipe)
    torch.testing.assert_close(tiny_pipe(**tiny_call(num_inference_steps=8)).images, plain, rtol=0, atol=0)
