"""``sd3plugin-cache verify [OVERRIDES]``: prove the warm start (fresh process, zero compilations)."""
from __future__ import annotations

from .common import add_common, compose_args, emit


def add_parser(sub):
    p = sub.add_parser("verify", help="load the configured pipeline with the cache in a fresh process, make "
                                      "one image, report time to first image and fresh compilations "
                                      "(exit 5 if it had to compile)")
    p.add_argument("--resolution", metavar="WxH", help="shape to verify (default: the first one warmed)")
    p.add_argument("--batch-size", type=int, help="images per prompt (default: the first one warmed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's steps)")
    p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS")
    p.add_argument("--cold", action="store_true",
                   help="the reference: same measurement compiling into empty caches (no cache needed, "
                        "compilations expected, exit 0)")
    p.add_argument("--baseline", action="store_true",
                   help="also start plain diffusers (eager) in a fresh process the same way; report its "
                        "breakdown, the ratio ours/baseline and the plugin's own share (package_seconds)")
    p.add_argument("--page-cache", choices=("warm", "dropped"),
                   help="read the model's files into the page cache (warm) or evict them (dropped) before "
                        "each process (default: as found)")
    return add_common(p)


def run(args) -> int:
    from sd3plugin.cache.errors import NothingCompiledError
    from sd3plugin.apps.verify import default_shape, select_entry, verify
    from sd3plugin.apps.warm import parse_resolutions
    from sd3plugin.cli.exit_codes import EXIT

    cfg = compose_args(args)
    # Model and machine mistakes first (exit 2, one line, as in run and warm), before the cache is looked at
    from sd3plugin.model_source import check_reachable
    from sd3plugin.preflight import check_runnable

    check_reachable(cfg.model)
    check_runnable(cfg)
    # Every recorded cache file is hashed; damaged ones are removed first (the run compiles them again).
    from sd3plugin.cache.lock import maintain

    upkeep = maintain(cfg.cache_dir, full=True) if not args.cold else {"repaired": [], "recovered": []}
    if upkeep["repaired"] and not args.cold:
        _entry_left(cfg, select_entry, upkeep["repaired"])
    shape = None
    if args.resolution or args.batch_size:
        first = default_shape(cfg) if args.cold else dict(select_entry(cfg)["shapes"][0])
        if args.resolution:
            (w, h), = parse_resolutions(args.resolution)[:1] or [(first["width"], first["height"])]
            first.update(width=w, height=h)
        if args.batch_size:
            first["batch_size"] = args.batch_size
        shape = first
    try:
        result = verify(cfg, args.overrides, shape=shape, steps=args.steps, timeout=args.timeout, cold=args.cold,
                        baseline=args.baseline, page_cache=args.page_cache)
        code = 0
    except NothingCompiledError as exc:
        if not hasattr(exc, "result"):
            raise
        result, code = {**exc.result, "error": str(exc)}, EXIT["compiled"]
    result["repaired"] = upkeep["repaired"] + list((result.get("cache") or {}).get("repaired") or [])
    result["recovered"] = upkeep["recovered"]
    text = summary(result, args.cold, code)
    if code:
        text += "\n" + result["error"]
    emit(args, {**result, "exit_code": code}, text)
    return code


def _entry_left(cfg, select_entry, repaired: list[dict]) -> None:
    """The entry to verify still exists, or CacheNotFoundError naming the damage that removed it."""
    from sd3plugin.cache.errors import CacheNotFoundError

    try:
        select_entry(cfg)
    except CacheNotFoundError as exc:
        found = "; ".join(f"{r['file']}: {r['problem']}" for r in repaired[:5])
        more = f" and {len(repaired) - 5} more" if len(repaired) > 5 else ""
        raise CacheNotFoundError(f"{exc} (verify found damaged cache files and removed them: {found}{more})") from None


def summary(result: dict, cold: bool, code: int) -> str:
    """verify's text output: the verdict line, then where the start-up time went."""
    from sd3plugin.startup import summary_line

    s = result["shape"]
    text = (f"{'COLD' if cold else 'OK' if code == 0 else 'COMPILED'}: {s['width']}x{s['height']} batch {s['batch_size']}, "
            f"time to first image {result['time_to_first_image_seconds']:.2f} s (import "
            f"{result['import_seconds']:.2f} s, load {result['load_seconds']:.2f} s, first image "
            f"{result['first_image_seconds']:.2f} s); fresh compilations {result['fresh_compilations']}, "
            f"cache hits {result['fxgraph_cache_hit']} FX graphs / {result['autograd_cache_hit']} AOTAutograd")
    att = result.get("attention") or {}
    if att.get("kernel"):
        text += f"; attention {att['kernel']}"
        if isinstance(att.get("prewarm"), dict) and att["prewarm"].get("state"):
            text += f" (FA4 prewarm: {att['prewarm']['state']})"
    if result.get("repaired"):
        text += (f"; {len(result['repaired'])} damaged cache file(s) removed and rebuilt: "
                 + ", ".join(f"{r['file']} ({r['problem']})" for r in result["repaired"][:5]))
    pre = result.get("precompiled") or {}
    if pre:
        text += (f"; precompiled blocks {'used' if pre.get('used') else 'not used'}"
                 + (f" ({pre['reason']})" if pre.get("reason") else ""))
    if result.get("coordesc_tuning_benchmarks"):
        why = ("the cached configs are not reused: SD3PLUGIN_KEEP_COORDESC=0" if not result.get("keep_coordesc")
               else "kernels whose tuned config the cache did not hold")
        text += (f"; {result['coordesc_tuning_benchmarks']} Triton kernel benchmarks of coordinate-descent "
                 f"tuning ran again ({why}; a mode without max-optimize avoids them)")
    line = summary_line(result.get("startup") or {})
    if result.get("baseline"):
        from sd3plugin.apps.baseline import summary_text

        line = (line + "\n" if line else "") + summary_text(result)
    return text + ("\n" + line if line else "")
