"""Render ``sd3plugin-bench`` results: bench.json, bench.md (the seed's table, with ratios) and bench.png."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

from .step_cache import table as step_cache_table

log = logging.getLogger("sd3plugin")


def _fmt(value, spec: str = ".2f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def _ratio(value, better_low: bool = False) -> str:
    if value is None:
        return ""
    pct = (value - 1) * 100
    return f" ({value:.2f}x)" if not better_low else f" ({pct:+.1f}%)"


def variants_table(data: dict) -> str:
    head = ["variant", "it/s", "E2E", "peak mem", "warm-up (compile)", "warm-up (shipped cache, new process)",
            "new graphs", "latents rel. err", "PSNR"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["variants"]:
        if "error" in r:
            rows.append(f"| `{r['label']}` | failed: {r['error'][:200]} |" + " |" * (len(head) - 2))
            continue
        q = r.get("quality", {})
        cache = r.get("cache_warm_start") or {}
        cache_txt = (f"{_fmt(cache.get('first_call_seconds'))} s (+{_fmt(cache.get('load_seconds'))} s load"
                     + (f", {cache['fresh_compilations']} compiled" if cache.get("fresh_compilations") is not None
                        else "") + ")"
                     if cache.get("first_call_seconds") is not None else ("failed" if cache else "-"))
        status = r.get("status")
        label = f"`{r['label']}`" + (f" ({status})" if status not in (None, "compiled", "eager") else "")
        rows.append("| " + " | ".join([
            label,
            _fmt(r["iterations_per_second"]) + _ratio(r.get("its_ratio")),
            _fmt(r["e2e_seconds"], ".3f", " s") + _ratio(r.get("e2e_ratio"), better_low=True),
            _fmt(r["peak_memory_gib"], ".3f", " GiB"),
            _fmt(r["warmup_compile_seconds"], ".1f", " s"),
            cache_txt,
            str(r.get("graphs_first_shape", "-")),
            _fmt(q.get("latents_rel_error"), ".2e"),
            _fmt(q.get("images_psnr_db"), ".1f", " dB"),
        ]) + " |")
    return "\n".join(rows)


def seed_table(data: dict, variant: dict) -> str:
    """The seed document's two-column table for one variant against eager."""
    eager = next((r for r in data["variants"] if r["label"] == "eager" and "error" not in r), None)
    v = variant
    rows = ["| Metric | |", "|---|---|"]
    if eager is not None:
        rows.append(f"| PyTorch iteration speed | {eager['iterations_per_second']:.2f} it/s |")
    rows.append(f"| sd3plugin iteration speed | {v['iterations_per_second']:.2f} it/s"
                + (f" ({(v['its_ratio'] - 1) * 100:+.1f}%)" if v.get("its_ratio") else "") + " |")
    if eager is not None:
        rows.append(f"| PyTorch E2E time | {eager['e2e_seconds']:.2f} s |")
    rows.append(f"| sd3plugin E2E time | {v['e2e_seconds']:.2f} s"
                + (f" ({(v['e2e_ratio'] - 1) * 100:+.1f}%)" if v.get("e2e_ratio") else "") + " |")
    if eager is not None:
        rows.append(f"| PyTorch Max Mem Used | {eager['peak_memory_gib']:.3f} GiB |")
    rows.append(f"| sd3plugin Max Mem Used | {v['peak_memory_gib']:.3f} GiB |")
    if eager is not None:
        rows.append(f"| PyTorch Warmup with Run time | {eager['warmup_compile_seconds']:.2f} s |")
    rows.append(f"| sd3plugin Warmup with Compilation time | {v['warmup_compile_seconds']:.2f} s |")
    cache = v.get("cache_warm_start") or {}
    if cache.get("first_call_seconds") is not None:
        rows.append(f"| sd3plugin Warmup with Cache time | {cache['first_call_seconds']:.2f} s |")
    return "\n".join(rows)


def resolutions_table(variant: dict) -> str:
    rows = ["| height x width | first call | new graphs |", "|---|---|---|"]
    for r in variant.get("resolutions", []):
        rows.append(f"| {r['height']}x{r['width']} | {r['first_call_seconds']:.2f} s | {r['new_graphs']} |")
    after_first = variant.get("resolutions", [])[1:]
    if after_first:
        rows.append(f"| **after the first shape** | max {max(r['first_call_seconds'] for r in after_first):.2f} s"
                    f" | {sum(r['new_graphs'] for r in after_first)} in all |")
    return "\n".join(rows)


def markdown(data: dict) -> str:
    v = data["versions"]
    lines = [
        f"# sd3plugin-bench: {data['model']}, {data['dtype'].replace('torch.', '')}, "
        f"{data['width']}x{data['height']}, {data['steps']} steps, CFG {data['guidance_scale']}",
        "",
        f"Device: {v.get('gpu') or data['device']}; torch {v.get('torch')}, triton {v.get('triton')}, "
        f"diffusers {v.get('diffusers')}, CUDA {v.get('cuda')}, python {v.get('python')}, "
        f"sd3plugin {v.get('sd3plugin')}.",
        "",
        f"Command: `{data['command']}`",
        "",
        "it/s: median over the timed calls' denoising steps (CUDA events); E2E: median full pipeline call "
        f"(text encoders, {data['steps']} steps, VAE decode); warm-up (compile): first call into an empty compile cache; "
        "warm-up (shipped cache): first image in a fresh process after sd3plugin-cache warm, pack, install into "
        "an empty dir (verify's figures; load time beside it); new graphs: graphs compiled at the first shape.",
        "",
        variants_table(data),
        "",
    ]
    sc = step_cache_table(data)
    if sc:
        lines += ["Step cache: each variant against the uncached image of the same seed (random weights: the "
                  "PSNR/SSIM say how far the cache drifts, not how good the image is; docs/step-cache.md).", "",
                  sc, ""]
    for r in data["variants"]:
        if r["label"] == "eager" or "error" in r:
            continue
        lines += [f"## `{r['label']}` (overrides: `{' '.join(r.get('overrides', []))}`)", "", seed_table(data, r), ""]
        if r.get("resolutions"):
            lines += ["Multiple resolutions:", "", resolutions_table(r), ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


_SAID: list[str] = []


def draw_chart(data: dict, path: Path) -> bool:
    """Bar chart of it/s per variant; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _SAID:  # the outputs are written after every variant: say it once
            _SAID.append("matplotlib")
            log.warning("sd3plugin-bench: matplotlib not installed, no chart (pip install matplotlib, or "
                        "pip install '.[bench]' from a checkout)")
        return False
    rows = [r for r in data["variants"] if "error" not in r]
    labels = [r["label"] for r in rows]
    its = [r["iterations_per_second"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels)), 3.6))
    bars = ax.bar(range(len(labels)), its, color=["#999999" if lb == "eager" else "#3060c0" for lb in labels])
    for bar, r in zip(bars, rows):
        txt = f"{r['iterations_per_second']:.1f}" + (f"\n{r['its_ratio']:.2f}x" if r.get("its_ratio") else "")
        ax.annotate(txt, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("iterations / s")
    ax.set_title(f"{data['model']} {data['width']}x{data['height']} on {data['versions'].get('gpu') or data['device']}",
                 fontsize=9)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(data: dict, out: Path, chart: bool = True, quiet: bool = False) -> dict:
    """Write bench.json, bench.md and (optionally) bench.png into ``out``; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "bench.json", json.dumps(data, indent=2, default=str))
    md = markdown(data)
    _write_atomic(out / "bench.md", md)
    if chart:
        draw_chart(data, out / "bench.png")
    if not quiet:
        print(md, flush=True)
    return data
