"""Where the time of one optimized transformer step goes: CUDA kernels grouped into matmuls, attention,
Triton (inductor's fused elementwise/norm kernels) and the rest, with the top kernels by time.

    python scripts/step_profile.py OUT.json [OVERRIDES...]     # default: model=sd3-medium mode=max-speed

CUDA graphs hide the kernels from the profiler, so the mode's ``cudagraphs`` token is dropped for the
profile (the step is otherwise the same). Inputs: SD3 at 1024x1024 with CFG (batch 2, 333 text tokens).
"""
from __future__ import annotations

import json
import statistics
import sys

import torch


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python scripts/step_profile.py OUT.json [OVERRIDES...]", file=sys.stderr)
        raise SystemExit(2)
    out_path, overrides = sys.argv[1], sys.argv[2:]
    from sd3plugin.environment import exit_without_cuda

    exit_without_cuda("scripts/step_profile.py")
    import sd3plugin
    from diffusers import SD3Transformer2DModel
    from sd3plugin.config import compose
    from sd3plugin.pipeline import model_path

    cfg = compose(None, ["model=sd3-medium", "mode=max-speed", *overrides])
    spec = ":".join(t for t in cfg.mode.spec.split(":") if t != "cudagraphs")
    folder = model_path(cfg)
    t = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float16).cuda()
    sd3plugin.optimize(t, overrides=["model=sd3-medium", "mode=max-speed", *overrides, f"mode.spec='{spec}'"])
    c = t.config
    g = torch.Generator(device="cuda").manual_seed(0)
    x = dict(hidden_states=torch.randn(2, c.in_channels, 128, 128, device="cuda", dtype=torch.float16, generator=g),
             encoder_hidden_states=torch.randn(2, 333, c.joint_attention_dim, device="cuda", dtype=torch.float16,
                                               generator=g),
             pooled_projections=torch.randn(2, c.pooled_projection_dim, device="cuda", dtype=torch.float16,
                                            generator=g),
             timestep=torch.tensor([500.0, 500.0], device="cuda"))
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
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                t(**x)
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time_total / 1e3)  # ms
    groups = {"matmul": 0.0, "attention": 0.0, "triton": 0.0, "other": 0.0}
    rows = []
    for name, ms in kernels.items():
        total = sum(ms) / 3
        low = name.lower()
        group = ("attention" if any(k in low for k in ("flash", "fmha", "attention", "cudnn", "fwd_kernel")) else
                 "matmul" if any(k in low for k in ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas")) else
                 "triton" if low.startswith(("triton", "tri_")) else "other")
        groups[group] += total
        rows.append({"kernel": name[:160], "group": group, "ms_per_step": round(total, 3), "calls_per_step": len(ms) // 3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "overrides": overrides,
              "spec_profiled": spec, "step_ms_median": round(statistics.median(times), 3),
              "groups_ms_per_step": {k: round(v, 3) for k, v in groups.items()},
              "report": sd3plugin.report(t), "top": rows[:40]}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("step_ms_median", "groups_ms_per_step")}))
    for r in rows[:25]:
        print(f'{r["ms_per_step"]:8.3f} ms {r["calls_per_step"]:4d}x {r["group"]:9s} {r["kernel"][:110]}')


if __name__ == "__main__":
    main()
