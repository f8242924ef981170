"""Attention kernels at SD3's shapes on this GPU: cuDNN, flash (FA2), efficient SDPA, FlashAttention-4,
FlashAttention-3 (`attention=fa3`: bf16, an fp16 input converted in the op; `attention=fa3_fp8`: Q/K/V
quantized to e4m3 with one scale per batch and head inside the op, timed with that quantization, plus the
kernel alone and the quantization alone; needs fa3-fwd, `pip download --no-deps fa3-fwd==0.0.3`),
sd3plugin's 8-bit kernels (`attention=int8`: int8 Q.K^T, 16-bit P.V; `attention=int8_fp8`: int8 Q.K^T, fp8
P.V; Triton; timed with their quantization compiled by torch.compile, as in the model, and the kernel alone),
plus SageAttention 1 (int8 Q.K^T, 16-bit P.V; Triton) where it is installed
(`pip download --no-deps sageattention==1.0.6 -d .whl` carries it).

    python scripts/attn_bench.py [--out attn.json]

Shape: batch 2 (CFG), 24 heads x 64, 4096 image + 333 text tokens (SD3-medium at 1024x1024), fp16 and
bf16. Median of 50 timed calls (CUDA events) after 10 warm-up calls; TFLOP/s counts 4*B*H*S^2*D.
Errors are relative to the math backend in fp32.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, n=50, warm=10):
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
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attn.json")
    ap.add_argument("--tokens", type=int, default=4096 + 333)
    args = ap.parse_args()
    from sd3plugin.environment import exit_without_cuda

    exit_without_cuda("scripts/attn_bench.py")
    from sd3plugin.kernels import attention, fa3, quantized_attention as qa

    quant16 = torch.compile(functools.partial(qa.quantize_qkv, pv="16bit"))
    quant8 = torch.compile(functools.partial(qa.quantize_qkv, pv="fp8"))

    B, S, H, D = 2, args.tokens, 24, 64
    flops = 4 * B * H * S * S * D
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [B, S, H, D],
               "rows": []}
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)
        kernels = {
            "cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt),
            "flash (FA2)": lambda: _sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt),
            "efficient": lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt),
            "fa4": lambda: attention.fa4_attention(q, k, v),
            "fa3 (bf16" + (", converted from fp16)" if dtype == torch.float16 else ")"): lambda: fa3.fa3_attention(q, k, v, False),
            "fa3_fp8 (per-head scales, quantization included)": lambda: fa3.fa3_attention(q, k, v, True),
            "fa3_fp8 kernel only": lambda: _fa3_fp8_kernel(fa3, pre_fp8),
            # timing only: returns q itself, so its rel_err column means nothing
            "fa3_fp8 quantize only (3 tensors, per head)": lambda: ([fa3.quantize_per_head(t) for t in (q, k, v)], q)[1],
            "sage (int8 QK)": lambda: _sage(q, k, v),
            "int8 (sd3plugin)": lambda: qa.int8_attention_op(*quant16(q, k, v), dtype),
            "int8_fp8 (sd3plugin)": lambda: qa.int8_attention_op(*quant8(q, k, v), dtype),
        }
        pre16, pre8 = quant16(q, k, v), quant8(q, k, v)
        pre_fp8 = [fa3.quantize_per_head(t) for t in (q, k, v)]
        kernels["int8 kernel only"] = lambda: qa.attention_quantized(*pre16, dtype)
        kernels["int8_fp8 kernel only"] = lambda: qa.attention_quantized(*pre8, dtype)
        kernels["quantize (compiled) only, fp8 P.V"] = lambda: quant8(q, k, v)[0]
        for name, fn in kernels.items():
            row = {"kernel": name, "dtype": str(dtype).replace("torch.", "")}
            try:
                t0 = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                if out.shape == ref.shape or out.transpose(1, 2).shape == ref.shape:
                    if out.shape != ref.shape:
                        out = out.transpose(1, 2)
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                ms = timed(fn)
                row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
            except Exception as exc:  # a kernel that does not run here is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            best = getattr(qa._kernel(True), "best_config", None) if "sd3plugin" in name else None
            if best is not None:
                row["triton_config"] = str(best)
            print(row, flush=True)
            results["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


def _fa3_fp8_kernel(fa3, pre):
    """FA3's fp8 kernel on Q/K/V quantized beforehand (what ``fa3_attention(..., True)`` runs after its
    quantization)."""
    (q8, qd), (k8, kd), (v8, vd) = pre
    out = fa3._fa3_func()(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v):
    from sageattention import sageattn  # ImportError is reported as this kernel's result

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sdpa(backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    main()
