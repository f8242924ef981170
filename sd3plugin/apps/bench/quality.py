"""A variant's error against eager: latents, images (PSNR/SSIM from ``sd3plugin.apps.quality``), a grid PNG."""
from __future__ import annotations

import logging
from pathlib import Path

from .options import label_slug

log = logging.getLogger("sd3plugin")


def quality_figures(ref: dict, eager: dict, out: Path, label: str) -> dict:
    """Relative error of latents, PSNR/SSIM of images against eager; a grid PNG in ``out``."""
    from .. import quality

    figs = {f"latents_{k}": v for k, v in quality.compare_latents(eager["latents"], ref["latents"]).items()}
    if ref["images"] and eager["images"]:
        try:
            img = quality.compare_images(eager["images"], ref["images"])
            figs.update(images_psnr_db=img["psnr"], images_ssim=img["ssim"])
        except ImportError as exc:  # scikit-image missing: PSNR still
            figs["images_psnr_db"] = float(sum(quality.psnr(a, b) for a, b in zip(
                quality.to_arrays(eager["images"]), quality.to_arrays(ref["images"]))) / len(ref["images"]))
            figs["images_ssim_error"] = str(exc)
        try:
            path = quality.save_grid(eager["images"], ref["images"], out / f"grid_{label_slug(label)}.png",
                                     labels=[f"{label} #{i}" for i in range(len(ref["images"]))])
            figs["grid"] = str(path)
        except Exception as exc:  # a grid is a nicety; the numbers matter
            log.warning("sd3plugin-bench: grid not written: %s", exc)
    figs["weights"] = "random"
    return figs
