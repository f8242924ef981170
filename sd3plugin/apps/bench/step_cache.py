"""Step-cache variants in the benchmark (docs/step-cache.md): ``bench.step_cache=dbcache,fbcache`` (or
``all``) adds, for every variant, a sibling with that preset; each variant with a step cache on is compared
with the *uncached* image of the same seed: the variant measured with the same config and ``step_cache=none``
(eager when there is none), giving its speed-up and PSNR/SSIM against that image, and the block computations
cache-dit reused."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ...config.step_cache import STEP_CACHE_PRESETS, is_on
from ...errors import ConfigError


def step_cache_presets(value) -> list[str]:
    """The presets ``bench.step_cache`` names (a comma list, a list, or ``all``); [] for null/empty."""
    if value is None or value == "":
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else map(str, value)) if v.strip()]
    if names == ["all"]:
        return [n for n in STEP_CACHE_PRESETS if n != "none"]
    bad = [n for n in names if n not in STEP_CACHE_PRESETS or n == "none"]
    if bad:
        raise ConfigError(f"bench.step_cache names {', '.join(map(repr, bad))}, not step-cache presets; valid: "
                          f"{', '.join(n for n in STEP_CACHE_PRESETS if n != 'none')} or all")
    return names


def with_step_caches(variants: list[tuple[str, list[str]]], presets: list[str]) -> list[tuple[str, list[str]]]:
    """Every variant followed by one sibling per preset (``LABEL+PRESET``, its overrides plus the preset)."""
    if not presets:
        return variants
    out = []
    for label, ovs in variants:
        out.append((label, ovs))
        out += [(f"{label}+{p}", [*ovs, f"step_cache={p}"]) for p in presets]
    return out


def _without_step_cache(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("step_cache", None)
    return c


def uncached_partner(label: str, cfg, measured: dict) -> str | None:
    """The label of the measured variant (``measured``: label -> config) whose config is ``cfg`` with
    ``step_cache=none`` (its other step_cache keys aside); else ``eager`` when measured; else None."""
    want = _without_step_cache(cfg)
    for other, ocfg in measured.items():
        if other != label and not is_on(ocfg.get("step_cache")) and _without_step_cache(ocfg) == want:
            return other
    return "eager" if "eager" in measured else None


def add_figures(result: dict, ref: dict, partner: dict, partner_ref: dict, out: Path, quality: bool,
                prompt: str | None = None) -> None:
    """``result["step_cache"]``: against whom, speed-up (it/s and E2E), PSNR/SSIM of the images, LPIPS and
    CLIP score (``prompt``) where their models are on this machine."""
    from .quality import quality_figures

    sc = result["step_cache"] = result.get("step_cache") or {}
    sc["against"] = partner["label"]
    sc["speedup_its"] = result["iterations_per_second"] / partner["iterations_per_second"]
    sc["speedup_e2e"] = partner["e2e_seconds"] / result["e2e_seconds"]
    if quality and ref is not None and partner_ref is not None:
        sc["quality"] = quality_figures(ref, partner_ref, out, f"{result['label']}-vs-{partner['label']}")
        if ref.get("images") and partner_ref.get("images"):  # LPIPS / CLIP score where the models are here
            from ..perceptual import perceptual_figures

            sc["quality"].update(perceptual_figures(partner_ref["images"], ref["images"], prompt))


def table(data: dict) -> str | None:
    """The markdown table of the step-cache variants (None when there are none)."""
    rows = [r for r in data["variants"] if "error" not in r and (r.get("step_cache") or {}).get("against")]
    if not rows:
        return None
    head = ["variant", "against (uncached)", "reused steps", "reused block computations / image",
            "speed-up it/s", "speed-up E2E", "PSNR", "SSIM", "LPIPS", "CLIP score (uncached)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sc = r["step_cache"]
        last = sc.get("last_call") or {}
        q = sc.get("quality") or {}
        psnr, ssim = q.get("images_psnr_db"), q.get("images_ssim")
        lines.append("| " + " | ".join([
            f"`{r['label']}`", f"`{sc['against']}`",
            f"{len(last.get('cached_steps', []))} / {last.get('steps', '-')}",
            f"{last.get('reused_block_computations_per_image', '-')} / {last.get('block_computations_per_image', '-')}",
            f"{sc['speedup_its']:.2f}x", f"{sc['speedup_e2e']:.2f}x",
            "identical" if psnr == float("inf") else "-" if psnr is None else f"{psnr:.1f} dB",
            "-" if ssim is None else f"{ssim:.4f}",
            "-" if q.get("images_lpips") is None else f"{q['images_lpips']:.4f}",
            "-" if q.get("clip_score") is None else f"{q['clip_score']:.2f} ({q['clip_score_uncached']:.2f})"]) + " |")
    return "\n".join(lines)
