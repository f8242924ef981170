"""Perceptual figures of a cached image against the uncached one, where the user's machine has the models:
LPIPS (the ``lpips`` package and its AlexNet weights) and CLIP score (a CLIP model in the local Hugging Face
cache). Nothing is downloaded: a missing package or model gives a reason instead of a number."""
from __future__ import annotations

import os

CLIP_MODEL = os.environ.get("SD3PLUGIN_CLIP_MODEL", "openai/clip-vit-base-patch16")


def _tensors(images):
    import numpy as np
    import torch

    from .quality import to_arrays

    return torch.from_numpy(np.stack(to_arrays(images))).permute(0, 3, 1, 2).float()  # N,C,H,W in [0, 1]


def lpips_distance(ref_images, out_images) -> tuple[float | None, str | None]:
    """Mean LPIPS (AlexNet; 0 is identical) of image pairs, or (None, why it was not computed)."""
    try:
        import lpips
    except ImportError:
        return None, "LPIPS needs the lpips package (pip install lpips) and its AlexNet weights"
    try:
        import torch

        net = lpips.LPIPS(net="alex", verbose=False).eval()
        with torch.no_grad():
            d = net(_tensors(ref_images) * 2 - 1, _tensors(out_images) * 2 - 1)  # LPIPS takes [-1, 1]
        return float(d.mean()), None
    except Exception as exc:  # no network for torchvision's AlexNet weights, a broken install...
        return None, f"LPIPS not computed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def clip_scores(images, prompt: str) -> tuple[list[float] | None, str | None]:
    """CLIP score of each image with ``prompt`` (100 x cosine, clamped at 0, as torchmetrics defines it) from
    ``CLIP_MODEL`` in the local Hugging Face cache only, or (None, why it was not computed)."""
    try:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(CLIP_MODEL, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(CLIP_MODEL, local_files_only=True)
    except Exception as exc:
        return None, (f"CLIP score needs {CLIP_MODEL} in the local Hugging Face cache (hf download {CLIP_MODEL}; "
                      f"SD3PLUGIN_CLIP_MODEL picks another): {type(exc).__name__}")
    from .quality import to_arrays

    pil = [(a * 255).round().clip(0, 255).astype("uint8") for a in to_arrays(images)]
    with torch.no_grad():
        inp = proc(text=[prompt] * len(pil), images=pil, return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return [float(100 * max(c, 0.0)) for c in cos.tolist()], None


def perceptual_figures(ref_images, out_images, prompt: str | None) -> dict:
    """``images_lpips``, ``clip_score`` and ``clip_score_uncached`` (means), each with a ``*_skipped`` reason
    instead when it cannot be computed here."""
    figs = {}
    d, why = lpips_distance(ref_images, out_images)
    figs.update({"images_lpips": d} if why is None else {"images_lpips_skipped": why})
    if isinstance(prompt, str) and prompt:
        out, why = clip_scores(out_images, prompt)
        if why is None:
            ref, _ = clip_scores(ref_images, prompt)
            figs.update(clip_score=sum(out) / len(out), clip_score_uncached=sum(ref) / len(ref))
        else:
            figs["clip_score_skipped"] = why
    return figs
