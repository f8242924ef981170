"""Quality metrics against known answers: relative error, PSNR, SSIM, the PNG grid."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sd3plugin.apps.quality import compare_images, compare_latents, save_grid, summary, to_arrays

pytest.importorskip("skimage")


def _images(n=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((size, size, 3)) for _ in range(n)]


def test_compare_latents_known_values():
    ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert compare_latents(ref, ref.clone()) == {"rel_error": 0.0, "max_abs_error": 0.0, "finite": True}
    err = compare_latents(ref, ref * 1.01)
    assert err["rel_error"] == pytest.approx(0.01, rel=1e-9)
    assert err["max_abs_error"] == pytest.approx(0.01 * ref.abs().max().item(), rel=1e-6)
    assert compare_latents(ref.numpy(), (ref * 1.01).half())["rel_error"] == pytest.approx(0.01, rel=1e-2)
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert compare_latents(ref, bad)["finite"] is False
    with pytest.raises(ValueError, match=r"latents differ in shape: reference \(2, 4, 8, 8\) vs optimized"):
        compare_latents(ref, ref[:1])


def test_compare_images_known_psnr_and_ssim():
    ref = _images()
    same = compare_images(ref, [a.copy() for a in ref])
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    # a constant offset of 0.01 has MSE 1e-4: PSNR exactly 40 dB
    shifted = [np.clip(a, 0, 0.98) for a in ref]
    out = compare_images(shifted, [a + 0.01 for a in shifted])
    assert out["psnr"] == pytest.approx(40.0, abs=1e-6) and len(out["psnr_per_image"]) == 2
    rng = np.random.default_rng(1)
    small = compare_images(ref, [np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1) for a in ref])
    large = compare_images(ref, [np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1) for a in ref])
    assert 1.0 > small["ssim"] > large["ssim"] and small["psnr"] > large["psnr"] + 20


def test_image_formats_give_the_same_numbers():
    ref = [(a * 255).round().astype(np.uint8) for a in _images()]
    out = [np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8) for a in ref]
    base = compare_images(ref, out)
    pil = compare_images([Image.fromarray(a) for a in ref], [Image.fromarray(a) for a in out])
    pt = compare_images(torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float() / 255,
                        torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255)
    for other in (pil, pt):
        assert other["psnr"] == pytest.approx(base["psnr"], rel=1e-5)
        assert other["ssim"] == pytest.approx(base["ssim"], rel=1e-5)
    assert to_arrays(Image.fromarray(ref[0]))[0].shape == (32, 32, 3)


def test_compare_images_errors():
    with pytest.raises(ValueError, match="2 reference images but 1 optimized"):
        compare_images(_images(2), _images(1))
    with pytest.raises(ValueError, match="use the same resolution"):
        compare_images(_images(1, 32), _images(1, 16))
    with pytest.raises(ValueError, match="too small for SSIM"):
        compare_images(_images(1, 2), _images(1, 2))


def test_save_grid(tmp_path):
    ref = _images(3, 24)
    out = [a.copy() for a in ref]
    out[1] = np.clip(out[1] + 0.05, 0, 1)
    path = save_grid(ref, out, tmp_path / "sub" / "grid.png", labels=["a", "b", "c"])
    assert path == tmp_path / "sub" / "grid.png" and list(path.parent.iterdir()) == [path]
    img = np.asarray(Image.open(path).convert("RGB"))
    pad, head, side = 4, 14, 120
    assert img.shape == (head + 3 * (24 + pad), side + 3 * (24 + pad), 3)
    cell = lambda r, c: img[head + r * 28: head + r * 28 + 24, side + c * 28: side + c * 28 + 24]
    np.testing.assert_array_equal(cell(0, 0), (ref[0] * 255).round().astype(np.uint8))
    assert cell(2, 0).max() == 0  # identical pair: black difference
    assert cell(2, 1).mean() > 100  # 0.05 x 10 = half brightness where not clipped
    with pytest.raises(ValueError, match="same non-zero number"):
        save_grid(ref, out[:2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_summary_says_which_weights():
    rec = summary({"rel_error": 0.01}, {"psnr": 40.0, "ssim": 0.99, "psnr_per_image": [40.0]}, weights="random")
    assert rec["weights"] == "random" and "random weights" in rec["note"]
    assert rec["latent_rel_error"] == 0.01 and rec["psnr"] == 40.0 and "psnr_per_image" not in rec
    assert "note" not in summary(weights="stabilityai/stable-diffusion-3-medium")
