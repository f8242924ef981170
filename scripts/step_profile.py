"""Where the time of one optimized transformer step goes: CUDA kernels grouped by what they do, with the
top kernels by time, written as JSON.

    python scripts/step_profile.py OUT.json [OVERRIDES...]     # default: model=sd3-medium mode=max-speed
    python scripts/step_profile.py OUT.json quant=fp8_e4m3_e4m3_dynamic      # the fp8 preset (bfloat16)
    python scripts/step_profile.py OUT.json backend=eager                    # plain diffusers, same inputs

Groups (``GROUPS``): ``gemm_fp8`` (``_scaled_mm`` / e4m3 GEMMs), ``gemm_16bit``, ``attention``, ``quantize``
(amax / scale / cast passes of the activations or of Q/K/V), ``norm_quantize`` (a norm or GELU kernel that
also quantizes its output: one pass instead of two), ``norm_modulation`` (LayerNorm, shift/scale, RMS
norm), ``elementwise`` (other fused Triton kernels: residual + gate, GELU, copies inductor fused), and
``other`` (copies, casts and reductions outside Triton). A kernel is classified by its name and by the
innermost operator that launched it (``aten::_scaled_mm``, ``aten::amax``...), so eager and compiled steps
are comparable.

CUDA graphs hide the kernels from the profiler, so the mode's ``cudagraphs`` token is dropped for the
profile (the step is otherwise the same). Inputs: SD3 at 1024x1024 with CFG (batch 2, 333 text tokens), in
the dtype the config resolves to (``dtype=auto``: bfloat16 for the fp8 presets, float16 otherwise).
"""
from __future__ import annotations

import json
import statistics
import sys

GROUPS = ("gemm_fp8", "gemm_16bit", "attention", "quantize", "norm_quantize", "norm_modulation", "elementwise",
          "other")
_ATTENTION = ("flash", "fmha", "attention", "attn", "fwd_kernel", "cudnn_generated_fort_native_sdpa")
_GEMM = ("gemm", "sm90_xmma", "sm100_xmma", "cutlass", "nvjet", "cublas", "_mm_", "matmul", "wgmma")
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::_addmm_activation", "aten::matmul",
             "aten::baddbmm", "aten::_int_mm")
_FP8 = ("e4m3", "e5m2", "f8f8", "fp8", "float8", "_scaled_mm", "qqtst")
_QUANT = ("amax", "abs_max", "float8", "fp8", "e4m3", "quantize", "scale")
_QUANT_OPS = ("aten::amax", "aten::abs", "aten::clamp", "aten::reciprocal", "quantize")
_NORM = ("layer_norm", "native_layer_norm", "var_mean", "rsqrt", "rms_norm", "group_norm", "_norm_")
_FUSED_QUANT = ("_gelu_quant", "fp8_gelu_quantize", "fp8_norm_modulate_quantize")  # fp8_fused_activation's kernels
_NORM_OPS = ("aten::native_layer_norm", "aten::layer_norm", "aten::rms_norm", "aten::_fused_rms_norm",
             "aten::var_mean")


def kernel_group(kernel: str, op: str = "") -> str:
    """The group of one CUDA kernel, from its name and the innermost operator that launched it ("" if none)."""
    low, op = kernel.lower(), op.lower()
    if any(k in low for k in _ATTENTION) or "attention" in op or "flash" in op or "fa3" in op or "fa4" in op:
        return "attention"
    if "_scaled_mm" in op or (any(k in low for k in _GEMM) and any(k in low for k in _FP8)):
        return "gemm_fp8"
    if any(k in low for k in _GEMM) or op in _GEMM_OPS:
        return "gemm_16bit"
    norm = any(k in low for k in _NORM) or op in _NORM_OPS or any(k in low or k in op for k in _FUSED_QUANT)
    quant = any(k in low for k in _QUANT) or ("clamp" in low and "_to_copy" in low) or any(
        k in op for k in _QUANT_OPS)
    if quant:
        return "norm_quantize" if norm else "quantize"
    if norm:
        return "norm_modulation"
    if low.startswith(("triton", "tri_")):
        return "elementwise"
    return "other"


def group_rows(rows: list[dict]) -> dict:
    """``{group: {"ms_per_step", "calls_per_step"}}`` summed over ``rows`` (every group present)."""
    out = {g: {"ms_per_step": 0.0, "calls_per_step": 0} for g in GROUPS}
    for r in rows:
        g = out[r["group"]]
        g["ms_per_step"] = round(g["ms_per_step"] + r["ms_per_step"], 3)
        g["calls_per_step"] += r["calls_per_step"]
    return out


def kernel_rows(prof, steps: int) -> list[dict]:
    """One row per (kernel, group) of a torch profile of ``steps`` steps, slowest first."""
    import torch

    found: dict[tuple[str, str], list[float]] = {}
    seen = set()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        for k in ev.kernels:  # kernels hang on the innermost operator that launched them
            seen.add(id(k))
            found.setdefault((k.name, kernel_group(k.name, ev.name)), []).append(k.duration / 1e3)  # us -> ms
    if not found:  # no operator recorded (a CUDA-only profile): by name alone
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                found.setdefault((ev.name, kernel_group(ev.name)), []).append(ev.device_time_total / 1e3)
    rows = [{"kernel": name[:160], "group": group, "ms_per_step": round(sum(ms) / steps, 4),
             "calls_per_step": len(ms) // steps} for (name, group), ms in found.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python scripts/step_profile.py OUT.json [OVERRIDES...]", file=sys.stderr)
        raise SystemExit(2)
    import torch

    out_path, overrides = sys.argv[1], sys.argv[2:]
    from sd3plugin.environment import exit_without_cuda

    exit_without_cuda("scripts/step_profile.py")
    import sd3plugin
    from diffusers import SD3Transformer2DModel
    from sd3plugin.config import compose
    from sd3plugin.config.resolve import resolve_dtype
    from sd3plugin.pipeline import model_path

    base = ["model=sd3-medium", "mode=max-speed", *overrides]
    cfg = compose(None, base)
    dtype = resolve_dtype(cfg.dtype, "cuda", cfg.quant.type) or torch.float16
    spec = ":".join(t for t in cfg.mode.spec.split(":") if t != "cudagraphs")
    folder = model_path(cfg)
    t = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).cuda()
    sd3plugin.optimize(t, overrides=[*base, f"mode.spec='{spec}'"])
    c = t.config
    g = torch.Generator(device="cuda").manual_seed(0)
    x = dict(hidden_states=torch.randn(2, c.in_channels, 128, 128, device="cuda", dtype=dtype, generator=g),
             encoder_hidden_states=torch.randn(2, 333, c.joint_attention_dim, device="cuda", dtype=dtype,
                                               generator=g),
             pooled_projections=torch.randn(2, c.pooled_projection_dim, device="cuda", dtype=dtype, generator=g),
             timestep=torch.tensor([500.0, 500.0], device="cuda"))
    steps = 3
    with torch.no_grad():
        for _ in range(5):
            t(**x)
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t(**x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                t(**x)
            torch.cuda.synchronize()
    rows = kernel_rows(prof, steps)
    groups = group_rows(rows)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "overrides": overrides,
              "dtype": str(dtype).replace("torch.", ""), "spec_profiled": spec,
              "step_ms_median": round(statistics.median(times), 3),
              "kernel_ms_per_step": round(sum(r["ms_per_step"] for r in rows), 3),
              "groups_ms_per_step": {k: v["ms_per_step"] for k, v in groups.items()},
              "groups": groups, "report": sd3plugin.report(t), "top": rows[:60]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("step_ms_median", "kernel_ms_per_step", "groups_ms_per_step")}))
    for r in rows[:25]:
        print(f'{r["ms_per_step"]:8.3f} ms {r["calls_per_step"]:4d}x {r["group"]:15s} {r["kernel"][:100]}')


if __name__ == "__main__":
    main()
