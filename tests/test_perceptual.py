"""LPIPS and CLIP score of the step-cache comparison: computed where the models are on this machine, a
reason instead of a number where they are not; nothing is downloaded."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sd3plugin.apps import perceptual


def _images(seed, n=2, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_without_the_models_each_figure_says_why(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    figs = perceptual.perceptual_figures(_images(0), _images(1), "a red cube")
    assert "images_lpips" not in figs and "pip install lpips" in figs["images_lpips_skipped"]
    assert "clip_score" not in figs and "local Hugging Face cache" in figs["clip_score_skipped"]
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())  # no download


def test_lpips_is_zero_for_identical_images_and_positive_otherwise(monkeypatch):
    seen = []

    class FakeLPIPS(torch.nn.Module):  # the lpips package's interface: images in [-1, 1], N x 1 x 1 x 1 out
        def __init__(self, net, verbose):
            super().__init__()
            seen.append(net)

        def forward(self, a, b):
            assert a.min() >= -1 and a.max() <= 1 and a.shape[1] == 3
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    same, why = perceptual.lpips_distance(_images(0), _images(0))
    assert (same, why) == (0.0, None) and seen == ["alex"]
    other, why = perceptual.lpips_distance(_images(0), _images(1))
    assert why is None and other > 0.1


def test_clip_score_from_a_local_model(tiny_path, tmp_path, monkeypatch):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=tok).save_pretrained(tmp_path / "clip")
    monkeypatch.setattr(perceptual, "CLIP_MODEL", str(tmp_path / "clip"))
    scores, why = perceptual.clip_scores(_images(0), "a red cube")
    assert why is None and len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    figs = perceptual.perceptual_figures(_images(0), _images(0), "a red cube")
    assert figs["clip_score"] == pytest.approx(figs["clip_score_uncached"])  # same images, same score
    again, _ = perceptual.clip_scores(_images(0), "a red cube")
    assert again == pytest.approx(scores)
