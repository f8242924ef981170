"""Where a warm start's first image spends its time: which Triton kernels still autotune or compile.

    python scripts/warm_start_trace.py OUT.json OVERRIDES...     (after `sd3plugin-cache warm/install`)

Runs the same child as `sd3plugin-cache verify` in this process, with inductor's CachingAutotuner and
triton.compile wrapped to record, per kernel: autotune-cache state (hit/miss and why), whether its
`.best_config` file exists, coordinate-descent runs, benchmarks and fresh Triton compilations with their
time. Developer tool for issue 4 (warm start); prints a summary and writes the events as JSON.
With SD3PLUGIN_KEEP_COORDESC=1 in the environment, the experimental fix of sd3plugin/compat/inductor.py is on:
compare the two runs' coordesc counts and first-image times.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

EVENTS: list[dict] = []


def _wrap(cls, name, kind):
    orig = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            info = dict(getattr(self, "autotune_cache_info", {}) or {})
            fn = getattr(self, "fn", None)
            EVENTS.append({"kind": kind, "kernel": getattr(fn, "__name__", "?"),
                           "file": os.path.basename(getattr(self, "filename", "") or ""),
                           "cache_state": info.get("autotune_cache_state"),
                           "num_configs": len(getattr(self, "configs", []) or []),
                           "seconds": round(time.perf_counter() - t0, 4)})
    setattr(cls, name, wrapper)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: python scripts/warm_start_trace.py OUT.json OVERRIDES...", file=sys.stderr)
        raise SystemExit(2)
    out_path, overrides = sys.argv[1], sys.argv[2:]
    from sd3plugin.environment import exit_without_cuda

    exit_without_cuda("scripts/warm_start_trace.py")
    from torch._inductor.runtime import triton_heuristics as th

    for name, kind in (("coordinate_descent_tuning", "coordesc"), ("autotune_to_one_config", "autotune"),
                       ("precompile", "precompile")):
        _wrap(th.CachingAutotuner, name, kind)
    import triton

    orig_compile = triton.compile

    def compile_(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig_compile(*args, **kwargs)
        finally:
            src = args[0] if args else kwargs.get("src")
            EVENTS.append({"kind": "triton.compile", "kernel": getattr(getattr(src, "fn", None), "__name__", "?"),
                           "seconds": round(time.perf_counter() - t0, 4)})
    triton.compile = compile_

    from sd3plugin.apps.verify import _child

    cache_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("cache_dir=")), None)
    payload = {"overrides": overrides, "cache_dir": cache_dir,
               "shape": {"width": 1024, "height": 1024, "batch_size": 1, "guidance": True}, "steps": None,
               "cold": False}
    result = _child(payload)
    summary = collections.Counter((e["kind"], e.get("cache_state")) for e in EVENTS)
    seconds = collections.defaultdict(float)
    for e in EVENTS:
        seconds[e["kind"]] += e["seconds"]
    report = {"result": result, "summary": {f"{k[0]}:{k[1]}": n for k, n in summary.items()},
              "seconds_by_kind": {k: round(v, 3) for k, v in seconds.items()}, "events": EVENTS}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({k: report[k] for k in ("summary", "seconds_by_kind")}, indent=1))
    print({k: result[k] for k in ("first_image_seconds", "load_seconds", "import_seconds", "fresh_compilations")})


if __name__ == "__main__":
    main()
