"""The fused activation quantization (sd3plugin/kernels/fp8_activation.py) against the separate passes, at
SD3-medium's shapes on this GPU (1024x1024, CFG: batch 2, 4096 image + 333 text tokens, width 1536, the
feed-forward's 6144), bfloat16. For each producer:

- ``eager``: the producer (LayerNorm + modulation, or tanh-GELU) storing bf16, then torchao's passes
  (amax per row, divide, clamp, cast), as torch ops;
- ``compiled``: the same function under torch.compile (what the fp8 preset runs today: inductor fuses what it
  can; its kernel count is reported);
- ``fused``: the one Triton kernel;
- ``gemm``: the fp8 matmul the quantized activation feeds (``torch._scaled_mm``, per-row scales), for scale.

Each row: median ms of 100 calls (CUDA events) after 20 warm-up calls, and the fused result's agreement with
the float32 reference (share of e4m3 values that differ, worst scale error). Writes JSON:

    python scripts/fp8_act_bench.py --out $OUT/h200-fp8-activation-quant.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from sd3plugin.kernels import fp8_activation as fa


def timed(fn, n=100, warm=20) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return round(statistics.median(times), 4)


def separate_norm(x, shift, scale):
    y = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=fa.LN_EPS) * (1 + scale[:, None]) + shift[:, None]
    return fa.torchao_style_quantize(y.to(torch.bfloat16).reshape(-1, x.shape[-1]))


def separate_gelu(h):
    return fa.torchao_style_quantize(torch.nn.functional.gelu(h, approximate="tanh"))


def kernel_count(fn, *args) -> int:
    """CUDA kernels one call of ``fn`` launches (profiler)."""
    fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def agreement(q, s, rq, rs) -> dict:
    return {"values_differ": (q.float() != rq.float()).float().mean().item(),
            "scale_rel_max": ((s - rs).abs() / rs).max().item()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="fp8-activation-quant.json")
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    w8 = {n: fa.torchao_style_quantize(torch.randn(n_out, n, device=dev, generator=g))
          for n, n_out in ((1536, 3 * 1536), (6144, 1536))}
    for name, (B, S, D) in {"norm_mod_image": (2, 4096, 1536), "norm_mod_context": (2, 333, 1536)}.items():
        x = torch.randn(B, S, D, device=dev, dtype=dt, generator=g) * 3
        shift = torch.randn(B, D, device=dev, dtype=dt, generator=g)
        scale = 0.3 * torch.randn(B, D, device=dev, dtype=dt, generator=g)
        comp = torch.compile(separate_norm)
        q, s = fa.norm_modulate_quantize(x, shift, scale)
        rq, rs = fa.reference_norm_modulate_quantize(x, shift, scale)
        wq, ws = w8[1536]
        rows.append({"producer": name, "shape": [B, S, D],
                     "eager_ms": timed(lambda: separate_norm(x, shift, scale)),
                     "compiled_ms": timed(lambda: comp(x, shift, scale)),
                     "compiled_kernels": kernel_count(comp, x, shift, scale),
                     "fused_ms": timed(lambda: fa.norm_modulate_quantize(x, shift, scale)),
                     "fused_kernels": kernel_count(fa.norm_modulate_quantize, x, shift, scale),
                     "gemm_ms": timed(lambda: fa.scaled_linear(q, s, wq, ws, None, dt)),
                     **agreement(q, s, rq, rs)})
        print(rows[-1])
    h = torch.randn(2 * 4096, 6144, device=dev, dtype=dt, generator=g) * 2
    comp = torch.compile(separate_gelu)
    q, s = fa.gelu_quantize(h)
    rq, rs = fa.reference_gelu_quantize(h)
    wq, ws = w8[6144]
    rows.append({"producer": "gelu_ff_image", "shape": list(h.shape), "eager_ms": timed(lambda: separate_gelu(h)),
                 "compiled_ms": timed(lambda: comp(h)), "compiled_kernels": kernel_count(comp, h),
                 "fused_ms": timed(lambda: fa.gelu_quantize(h)), "fused_kernels": kernel_count(fa.gelu_quantize, h),
                 "gemm_ms": timed(lambda: fa.scaled_linear(q, s, wq, ws, None, dt)), **agreement(q, s, rq, rs)})
    print(rows[-1])
    for r in rows:
        r["speedup_vs_compiled"] = round(r["compiled_ms"] / r["fused_ms"], 3)
    # per step: 24 blocks x (norm1 + norm1_context + norm2 + norm2_context, GELU image + context)
    per_step = 24 * (2 * rows[0]["compiled_ms"] + 2 * rows[1]["compiled_ms"] + rows[2]["compiled_ms"]) - 24 * (
        2 * rows[0]["fused_ms"] + 2 * rows[1]["fused_ms"] + rows[2]["fused_ms"])
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "rows": rows,
              "speedup": round(sum(r["compiled_ms"] for r in rows) / sum(r["fused_ms"] for r in rows), 3),
              "saved_ms_per_step_estimate": round(per_step, 3),
              "note": "speedup: compiled separate passes / fused kernel, summed over the three producers; "
                      "saved_ms_per_step_estimate leaves out the GELU of the context stream (333 rows)"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("speedup", "saved_ms_per_step_estimate")}))


if __name__ == "__main__":
    main()
