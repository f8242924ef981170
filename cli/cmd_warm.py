"""``sd3plugin-cache warm [OVERRIDES] --resolutions WxH,... --batch-sizes 1,2``: compile ahead of time."""
from __future__ import annotations

from .common import add_common, compose_args, emit


def add_parser(sub):
    p = sub.add_parser("warm", help="compile the configured pipeline for given shapes into the cache dir",
                       description="Compile what the configured pipeline needs for each resolution and batch "
                                   "size (one short call each) and store it as a cache entry. Works without "
                                   "weights: model=sd3-medium builds the architecture with random weights.")
    p.add_argument("--resolutions", default="", metavar="WxH,...",
                   help="comma-separated WIDTHxHEIGHT list (default: the config's height/width or the "
                        "model's native size)")
    p.add_argument("--batch-sizes", default="", metavar="N,...",
                   help="images per prompt to warm (default: the config's num_images)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per warm-up call (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return add_common(p, lock=True)


def run(args) -> int:
    from sd3plugin.apps.warm import check_warmable, parse_batch_sizes, parse_resolutions, plan_shapes, warm
    from sd3plugin.errors import ConfigError

    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps} must be at least 1")
    cfg = compose_args(args)
    check_warmable(cfg)
    from sd3plugin.model_source import check_model_source
    from sd3plugin.preflight import check_runnable

    check_model_source(cfg.model)  # a folder that is not there: before the cache dir is created or locked
    check_runnable(cfg)  # an explicit backend / attention / quant that cannot run here: likewise
    shapes = plan_shapes(cfg, parse_resolutions(args.resolutions), parse_batch_sizes(args.batch_sizes))
    result = warm(cfg, shapes, steps=args.steps, lock_timeout=args.lock_timeout,
                  progress=not (args.no_progress or args.json))
    lines = [f"warmed {result['fingerprint']} in {result['cache_dir']} ({result['backend']}, mode "
             f"{result['mode']!r}): {result['blob_bytes']} bytes of Mega-Cache ("
             + ", ".join(f"{v} {k}" for k, v in result["artifacts"].items()) + ")"]
    pre = result.get("precompiled") or {}
    if pre.get("reason"):
        lines.append(f"  precompiled blocks: none ({pre['reason']})")
    elif pre:
        lines.append(f"  precompiled blocks: {pre['built']} built in {pre['seconds']:.1f} s, {pre['kept']} kept, "
                     f"{pre['artefacts']} in the entry "
                     f"({pre['size_bytes']} bytes)" + "".join(f"\n    not precompiled: {e}" for e in pre["errors"]))
    for s in result["shapes"]:
        lines.append(f"  {s['width']}x{s['height']} batch {s['batch_size']}: {s['seconds']:.1f} s, "
                     f"{s['fresh_compilations']} compiled, {s['fxgraph_cache_hit']} from cache")
    emit(args, result, "\n".join(lines))
    return 0
