"""The fp8 issue's figures out of one sd3plugin-bench run (eager bf16 + one optimized variant, same process,
same inputs): it/s ratio as ``speedup``, E2E, PSNR vs eager, first-call time, and each target met or not.

    python scripts/fp8_summary.py BENCH_JSON OUT_JSON [VARIANT_LABEL [BASE_LABEL]]   # default: the first non-eager

With BASE_LABEL (another variant of the same run, e.g. the fp8 preset without ``fp8_fused_activation``) the
JSON also holds that variant's summary under ``base`` and ``speedup_vs_base`` (it/s ratio), ``e2e_delta_seconds``
and ``first_call_delta_seconds``.
"""
from __future__ import annotations

import json
import sys

# issue 23's targets, vs bf16 eager in the same process
TARGETS = {"speedup": (">=", 1.85), "psnr_db": (">=", 38.0), "e2e_seconds": ("<=", 0.95),
           "first_call_seconds": ("<=", 45.0)}
TARGETS_16BIT = {"e2e_seconds": ("<=", 1.15)}


def summarize(bench: dict, label: str | None = None) -> dict:
    variants = {v["label"]: v for v in bench["variants"]}
    eager = variants["eager"]
    label = label or next(k for k in variants if k != "eager")
    v = variants[label]
    quant = v.get("optimization", {}).get("quant", {}).get("type", "none")
    out = {"gpu": bench.get("versions", {}).get("gpu"), "versions": bench.get("versions"),
           "command": bench.get("command"), "variant": label, "overrides": v.get("overrides"),
           "dtype": bench.get("dtype"), "num_images": bench.get("num_images"), "steps": bench.get("steps"),
           "eager_its": eager["iterations_per_second"], "its": v["iterations_per_second"],
           "speedup": round(v["iterations_per_second"] / eager["iterations_per_second"], 4),
           "step_ms_median": round(1e3 * v["step_seconds_median"], 3),
           "eager_step_ms_median": round(1e3 * eager["step_seconds_median"], 3),
           "e2e_seconds": v["e2e_seconds"], "eager_e2e_seconds": eager["e2e_seconds"],
           "e2e_all_seconds": v.get("e2e_all_seconds"),
           "psnr_db": (v.get("quality") or {}).get("images_psnr_db"),
           "latents_rel_error": (v.get("quality") or {}).get("latents_rel_error"),
           "first_call_seconds": v.get("warmup_compile_seconds"), "status": v.get("status"),
           "compiled_modules": v.get("optimization", {}).get("compiled_modules"),
           "peak_memory_gib": v.get("peak_memory_gib"), "eager_peak_memory_gib": eager.get("peak_memory_gib")}
    targets = TARGETS if quant.startswith("fp8") else TARGETS_16BIT
    met = {}
    for key, (op, bound) in targets.items():
        value = out.get(key)
        met[key] = {"target": f"{op} {bound}", "value": value,
                    "met": None if value is None else (value >= bound if op == ">=" else value <= bound)}
    out["targets"] = met
    return out


def compare(bench: dict, label: str, base_label: str) -> dict:
    """``label``'s summary with ``base_label``'s beside it (both against the same eager run)."""
    out, base = summarize(bench, label), summarize(bench, base_label)
    out["base"] = base
    out["speedup_vs_base"] = round(out["its"] / base["its"], 4)
    for key in ("e2e_seconds", "first_call_seconds"):
        if out.get(key) is not None and base.get(key) is not None:
            out[key.replace("_seconds", "_delta_seconds")] = round(out[key] - base[key], 3)
    return out


def main() -> None:
    bench_path, out_path = sys.argv[1], sys.argv[2]
    label = sys.argv[3] if len(sys.argv) > 3 else None
    with open(bench_path) as f:
        bench = json.load(f)
    result = compare(bench, label, sys.argv[4]) if len(sys.argv) > 4 else summarize(bench, label)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    keys = ("variant", "speedup", "speedup_vs_base", "e2e_seconds", "psnr_db", "first_call_seconds")
    print(json.dumps({k: result[k] for k in keys if k in result}))


if __name__ == "__main__":
    main()
