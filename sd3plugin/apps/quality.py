"""Output quality of an optimized pipeline against eager: same prompts, same seeds, compare the results.

``compare_latents(ref, out)`` -> relative error of the final latents; ``compare_images(ref, out)`` ->
PSNR and SSIM of the decoded images (SSIM from scikit-image: ``pip install scikit-image``);
``save_grid(ref, out, path)`` writes a PNG with the eager row, the optimized row and their difference.
With random weights (all that is available here) the numbers measure numerical drift, not image quality
as people see it: say which weights were used next to every figure (``summary(..., weights=...)``).
"""
from __future__ import annotations

import sys

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DIFF_GAIN = 10  # the grid's difference row shows |ref - out| x DIFF_GAIN


def compare_latents(ref, out) -> dict:
    """Relative error ||out - ref|| / ||ref|| (Frobenius norm, float64) and the largest absolute error."""
    ref_t, out_t = _as_tensor(ref), _as_tensor(out)
    if ref_t.shape != out_t.shape:
        raise ValueError(f"latents differ in shape: reference {tuple(ref_t.shape)} vs optimized "
                         f"{tuple(out_t.shape)}; compare outputs of the same prompts, seeds and resolution")
    diff = out_t - ref_t
    norm = ref_t.norm().item()
    return {
        "rel_error": diff.norm().item() / norm if norm > 0 else (0.0 if diff.norm().item() == 0 else math.inf),
        "max_abs_error": diff.abs().max().item() if diff.numel() else 0.0,
        "finite": bool(torch.isfinite(out_t).all().item()),
    }


def compare_images(ref_imgs, out_imgs) -> dict:
    """Mean PSNR (dB, inf when identical) and SSIM over image pairs, plus the per-image values."""
    refs, outs = to_arrays(ref_imgs), to_arrays(out_imgs)
    if len(refs) != len(outs):
        raise ValueError(f"{len(refs)} reference images but {len(outs)} optimized ones; generate the same "
                         "prompts and seeds with both pipelines")
    if not refs:
        raise ValueError("no images to compare")
    psnrs, ssims = [], []
    for i, (a, b) in enumerate(zip(refs, outs)):
        if a.shape != b.shape:
            raise ValueError(f"image {i}: reference {a.shape} vs optimized {b.shape}; use the same resolution")
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
            "psnr_per_image": psnrs, "ssim_per_image": ssims}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two float images in [0, 1]."""
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two HxWxC float images in [0, 1] (scikit-image, Gaussian-free 7x7 window)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise ImportError("SSIM needs scikit-image: pip install scikit-image (or pip install '.[bench]' from "
                          "a checkout of sd3plugin)") from None
    win = min(7, a.shape[0], a.shape[1])
    win -= 1 - win % 2  # odd
    if win < 3:
        raise ValueError(f"images of {a.shape[0]}x{a.shape[1]} pixels are too small for SSIM (3x3 at least)")
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, win_size=win))


def to_arrays(images) -> list[np.ndarray]:
    """PIL images, HxWxC uint8/float arrays or NxCxHxW / CxHxW tensors in [0, 1] -> float64 HxWxC arrays."""
    from PIL import Image

    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        else:
            images = [images]
    out = []
    for img in images:
        if isinstance(img, Image.Image):
            arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
        elif isinstance(img, torch.Tensor):
            arr = img.detach().float().cpu().numpy()
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = arr.transpose(1, 2, 0)
            arr = arr.astype(np.float64)
        else:
            arr = np.asarray(img)
            arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"cannot read an image of shape {arr.shape}; give PIL images, HxWxC arrays or "
                             "CxHxW tensors")
        out.append(np.clip(arr, 0.0, 1.0))
    return out


def save_grid(ref_imgs, out_imgs, path, labels: Sequence[str] | None = None,
              titles: Sequence[str] = ("reference (eager)", "optimized", f"|difference| x{DIFF_GAIN}")) -> Path:
    """Write a PNG: one column per image pair; rows reference, optimized, amplified difference."""
    from PIL import Image, ImageDraw

    refs, outs = to_arrays(ref_imgs), to_arrays(out_imgs)
    if len(refs) != len(outs) or not refs:
        raise ValueError(f"need the same non-zero number of reference and optimized images, got "
                         f"{len(refs)} and {len(outs)}")
    rows = [refs, outs, [np.clip(np.abs(a - b) * DIFF_GAIN, 0, 1) for a, b in zip(refs, outs)]]
    h = max(a.shape[0] for a in refs)
    w = max(a.shape[1] for a in refs)
    pad, head, side = 4, 14, 120
    canvas = Image.new("RGB", (side + len(refs) * (w + pad), head + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels or [f"#{i}" for i in range(len(refs))]):
        draw.text((side + c * (w + pad), 1), str(label)[: max(4, w // 6)], fill="black")
    for r, (title, row) in enumerate(zip(titles, rows)):
        y = head + r * (h + pad)
        draw.text((2, y + h // 2 - 6), title, fill="black")
        for c, arr in enumerate(row):
            rgb = arr if arr.shape[-1] == 3 else np.repeat(arr[..., :1], 3, axis=-1)
            canvas.paste(Image.fromarray((rgb * 255).round().astype(np.uint8)), (side + c * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)  # write whole, then rename: no half files
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def summary(latents: dict | None = None, images: dict | None = None, *, weights: str) -> dict:
    """One quality record; ``weights`` says what the figures mean ("random" or a checkpoint name)."""
    rec = {"weights": weights}
    if weights == "random":
        rec["note"] = ("random weights: the figures measure numerical drift against eager, not the visual "
                       "quality of trained-model images")
    if latents:
        rec.update({f"latent_{k}": v for k, v in latents.items()})
    if images:
        rec.update({k: v for k, v in images.items() if k in ("psnr", "ssim")})
    return rec


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected latents as a tensor or array, got {type(x).__name__}")
    return x.detach().to("cpu", torch.float64)


def latent_ssim(ref, out) -> float:
    """Mean SSIM of latent-shaped tensors (N x C x H x W), channels as image channels, range of ``ref``."""
    from skimage.metrics import structural_similarity

    ref_t, out_t = _as_tensor(ref), _as_tensor(out)
    if ref_t.dim() == 3:
        ref_t, out_t = ref_t[None], out_t[None]
    rng = float(ref_t.max() - ref_t.min()) or 1.0
    win = min(7, ref_t.shape[-2], ref_t.shape[-1])
    win -= 1 - win % 2
    return float(np.mean([structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                                                data_range=rng, channel_axis=-1, win_size=win)
                          for a, b in zip(ref_t, out_t)]))


def layer_sensitivity(transformer, quant_type: str, inputs: dict, names: Sequence[str] | None = None,
                      progress: bool = True) -> dict:
    """Quantize one Linear layer at a time and measure the transformer's output against the original.

    Returns the seed's JSON form ``{module: {"ssim": ..., "rel_error": ...}}`` (SSIM of the predicted
    noise, not of decoded images) for ``quant.submodules_config_path`` with ``quant.top_percentage``.
    ``inputs`` are the transformer's keyword arguments for one step (hidden_states, timestep, ...).
    """
    from tqdm import tqdm
    from torchao.quantization import quantize_

    from ..quant import linear_modules, preset

    make_config = preset(quant_type).torchao_config
    if make_config is None:
        raise ValueError("quant_type=none quantizes nothing; give a preset such as int8_dynamic")
    linears = linear_modules(transformer)
    unknown = [n for n in names or () if n not in linears]
    if unknown:
        raise ValueError(f"not Linear layers of this transformer: {', '.join(unknown[:20])}")
    with torch.no_grad():
        ref = transformer(**inputs, return_dict=False)[0]
    result = {}
    for name in tqdm(list(names or linears), desc=f"{quant_type} per layer", disable=not progress):
        mod = linears[name]
        saved = mod.weight
        try:
            quantize_(mod, make_config())
            with torch.no_grad():
                out = transformer(**inputs, return_dict=False)[0]
        finally:
            mod.weight = saved
            mod.__dict__.pop("extra_repr", None)
        result[name] = {"ssim": latent_ssim(ref, out), "rel_error": compare_latents(ref, out)["rel_error"]}
    return result


def write_submodules_json(metrics: dict, path) -> Path:
    """Write ``layer_sensitivity``'s result as the JSON that ``quant.submodules_config_path`` reads."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def random_transformer_inputs(config, height: int, width: int, batch: int = 2, text_tokens: int = 333,
                              device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """One denoising step's transformer inputs of the right shapes (CFG batch 2, 77 CLIP + 256 T5 tokens)."""
    g = torch.Generator("cpu").manual_seed(seed)
    lat = (batch, config.in_channels, height // 8, width // 8)
    t = {"hidden_states": torch.randn(lat, generator=g),
         "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=g),
         "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g)}
    t = {k: v.to(device, dtype) for k, v in t.items()}
    t["timestep"] = torch.full((batch,), 500.0, device=device, dtype=dtype)
    return t


def main(argv=None) -> int:
    """``python -m sd3plugin.apps.quality sensitivity``: per-layer quantization error -> seed-form JSON.
    Exit 2 with one line for a preset this machine cannot run or a model that cannot be found."""
    import argparse

    from ..models import ARCHITECTURES

    p = argparse.ArgumentParser(prog="python -m sd3plugin.apps.quality")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sensitivity", help="quantize one Linear layer at a time, measure the output error")
    s.add_argument("--model", default="sd3-medium",
                   help=f"architecture with random weights ({', '.join(ARCHITECTURES)}) or a diffusers folder")
    s.add_argument("--quant", default="int8_dynamic", help="quantization preset")
    s.add_argument("--height", type=int, default=1024)
    s.add_argument("--width", type=int, default=1024)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--layers", nargs="*", default=["*"], help="fnmatch patterns of the layers to measure")
    s.add_argument("--out", required=True, help="JSON file for quant.submodules_config_path")
    args = p.parse_args(argv)
    from ..errors import ConfigError

    try:
        return _sensitivity(args)
    except ConfigError as exc:  # a preset this machine cannot run, a model that is not there: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


def check_sensitivity_needs() -> None:
    """The sensitivity command's optional libraries, checked before anything loads: ConfigError (exit 2)
    naming the extra that installs them."""
    from ..errors import ConfigError

    try:
        from skimage.metrics import structural_similarity  # noqa: F401
    except ImportError:
        raise ConfigError("sensitivity measures SSIM with scikit-image, which is not installed: install the "
                          "bench extra (pip install '.[bench]' in a checkout of sd3plugin) or pip install "
                          "scikit-image") from None
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("sensitivity quantizes with torchao, which is not installed: install the quant "
                          "extra (pip install '.[quant]' in a checkout of sd3plugin) or pip install torchao")


def _sensitivity(args) -> int:
    import fnmatch
    import time

    check_sensitivity_needs()  # before the heavy imports: a missing extra is one line, at once
    from diffusers import SD3Transformer2DModel

    from ..model_source import check_model_source, is_load_error, load_error
    from ..models import ARCHITECTURES
    from ..pipeline import dtype_kwarg
    from ..quant import check_device, linear_modules

    check_device(args.quant, args.device)
    check_model_source(args.model)
    dtype = getattr(torch, args.dtype)
    if args.model in ARCHITECTURES:
        weights = "random"
        torch.manual_seed(0)
        with torch.device(args.device):
            transformer = SD3Transformer2DModel(**ARCHITECTURES[args.model].transformer)
        transformer = transformer.to(dtype).eval()
    else:
        weights = args.model
        try:
            transformer = SD3Transformer2DModel.from_pretrained(args.model, subfolder="transformer",
                                                                **{dtype_kwarg(): dtype})
        except (OSError, ValueError) as exc:  # no such repo, no network, an incomplete folder
            if not is_load_error(args.model, exc):
                raise
            raise load_error(args.model, exc) from exc
        transformer = transformer.to(args.device).eval()
    inputs = random_transformer_inputs(transformer.config, args.height, args.width, device=args.device, dtype=dtype)
    names = [n for n in linear_modules(transformer) if any(fnmatch.fnmatchcase(n, pat) for pat in args.layers)]
    started = time.perf_counter()
    metrics = layer_sensitivity(transformer, args.quant, inputs, names)
    write_submodules_json(metrics, args.out)
    worst = sorted(metrics, key=lambda n: metrics[n]["rel_error"], reverse=True)[:10]
    print(f"{len(metrics)} layers of {args.model} ({weights} weights), quant={args.quant}, "
          f"{args.height}x{args.width}, {time.perf_counter() - started:.1f} s -> {args.out}")
    print("largest output errors: " + ", ".join(f"{n} {metrics[n]['rel_error']:.2e}" for n in worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
