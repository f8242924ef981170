"""``sd3plugin-cache doctor [--json] [--fix] [--cache-dir DIR] [key=value ...]``: what this machine can run, and why not.

Reports python/torch/triton/CUDA/cuDNN/diffusers/onediff/nexfort versions, the GPU (compute capability,
fp8), which backends are usable (and why not), the cache dir and its size, and nexfort's misplaced
extension modules (onediff#1189). ``--fix`` copies them where nexfort imports them from (idempotent).
"""
from __future__ import annotations

import json
import sys

from sd3plugin.cache.store import human_size

from .common import add_common, compose_args
from .exit_codes import EXIT


def add_parser(subparsers):
    p = subparsers.add_parser("doctor", help="check versions, GPU, usable backends, cache dir; --fix nexfort",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--fix", action="store_true",
                   help="copy nexfort's misplaced extension modules into nexfort/inductor/codegen/")
    return add_common(p)


def render(rep: dict) -> str:
    v, gpu = rep["versions"], rep["gpu"]
    lines = ["sd3plugin doctor", "", "versions:"]
    for key in ("python", "torch", "triton", "cuda", "cudnn", "diffusers", "transformers", "huggingface-hub",
                "onediff", "onediffx", "nexfort", "torchao", "flash-attn-4", "nvidia-cutlass-dsl", "sd3plugin"):
        lines.append(f"  {key:<19} {v.get(key) if v.get(key) is not None else '-'}")
    if gpu["available"]:
        lines.append(f"gpu: {gpu['name']} (x{gpu['count']}), compute capability {gpu['capability']}, "
                     f"fp8 {'yes' if gpu['fp8'] else 'no (needs >= 8.9)'}")
    else:
        lines.append("gpu: none visible to torch (CPU only; fp8 no)")
    lines.append("backends:")
    for name, info in rep["backends"].items():
        if name == "auto":
            continue
        lines.append(f"  {name:<9} {'usable' if info['usable'] else 'NOT usable'}: {info['reason']}")
    lines.append(f"  {'auto':<9} -> {rep['backends']['auto']['chooses']} ({rep['backends']['auto']['reason']})")
    lines.append(f"attention: auto -> {rep['attention']['auto_chooses']} ({rep['attention']['reason']})")
    cache = rep["cache"]
    lines.append(f"cache dir: {cache['dir']} ({human_size(cache['size_bytes']) if cache['exists'] else 'not created yet'})")
    lines.append("  coordinate-descent configs reused at warm starts: " + {
        "on": "yes (SD3PLUGIN_KEEP_COORDESC=0 turns it off)",
        "off": "no (SD3PLUGIN_KEEP_COORDESC=0): kernels are tuned again in every process",
    }.get(cache["keep_coordesc"], "torch's own caching (this torch has no CachingAutotuner.recheck_autotune_cache)"))
    if "precompile" in cache:
        pre = cache["precompile"]
        lines.append(f"  precompiled transformer blocks: {'yes' if pre['supported'] else 'no'} ({pre['reason']})")
    misplaced = rep["nexfort_layout"]["misplaced"]
    if misplaced:
        lines.append(f"nexfort layout: {len(misplaced)} extension module(s) missing (onediff#1189): "
                     f"{', '.join(misplaced)}; run `sd3plugin-cache doctor --fix`")
    elif rep["nexfort_layout"]["target"]:
        lines.append("nexfort layout: ok")
    for action in rep.get("fixed", []):
        lines.append(f"fix: {action}")
    return "\n".join(lines)


def run(args) -> int:
    from sd3plugin import environment
    from sd3plugin.apps import doctor
    cfg = compose_args(args)  # --cache-dir applied: the report names that cache dir
    fixed: list[str] = []
    if args.fix:
        try:
            fixed = environment.fix_nexfort_layout()
        except environment.LayoutFixError as exc:
            if args.json:
                print(json.dumps({"ok": False, "error": str(exc), "exit_code": EXIT["cannot_write"]}))
            print(f"sd3plugin-cache doctor --fix: {exc}", file=sys.stderr)
            return EXIT["cannot_write"]
        environment.nexfort_status.cache_clear()
        if not fixed:
            fixed = ["nothing to fix: nexfort's layout is fine" if environment.nexfort_distribution()
                     is not None else "nothing to fix: nexfort is not installed"]
    rep = doctor.report(cfg)
    rep["fixed"] = fixed
    rep["ok"] = True
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print(render(rep))
    return EXIT["ok"]
