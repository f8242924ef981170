"""The benchmark's own settings (``bench.<key>=value``) and the variant grammar.

``split_bench_overrides(argv)`` takes the ``bench.*`` overrides out of a command line and returns a
validated ``BenchConfig``; ``parse_variants`` reads ``"[LABEL=]k=v k=v; ..."``; ``resolution_shapes`` lists
the shapes of the multiple-resolution pass; ``check_shared_dtype`` refuses variants that cannot share one
loaded pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from ...errors import ConfigError

# The command line as the user gave it (main() records it; Hydra later sees only the translated rest).
COMMAND_LINE: list[str] = []

# The seed script's --run_multiple_resolutions list, used in each dimension (7 x 7 shapes).
SEED_RESOLUTIONS = [1536, 1024, 768, 720, 576, 512, 256]

# Keys a variant may not change: every variant runs on the one pipeline the command line loads.
SHARED_KEYS = ("model", "device", "dtype", "cache_dir")


@dataclass
class BenchConfig:
    """The benchmark's own settings (``bench.<key>=value`` on the command line)."""

    # Override sets to compare with eager: a list of strings or a mapping label -> overrides.
    variants: Any = field(default_factory=lambda: [""])  # "": the command line's config as it is
    eager: bool = True               # measure the eager baseline first (ratios need it)
    warmup: int = 1                  # warm-up calls before timing (the first one compiles)
    repeat: int = 3                  # timed full pipeline calls (e2e median; steps of all calls for it/s)
    multiple_resolutions: bool = False
    resolutions: Optional[list[int]] = None  # None: the SEED_RESOLUTIONS the model takes
    square_only: bool = False        # only (r, r) instead of every (height, width) pair
    resolution_steps: Optional[int] = None  # denoising steps of each per-shape call (default: steps)
    cache_warmup: bool = True        # warm start from a shipped cache (sd3plugin-cache warm/pack/install/verify)
    cold_process: bool = False       # also measure the cold first image in a fresh process (empty cache)
    fresh_cache: bool = True         # compile each variant into an empty cache dir (true cold numbers)
    keep_caches: bool = False        # keep those cache dirs under output_dir/caches
    quality: bool = True             # error of latents/images against eager
    step_cache: Any = None           # step-cache presets added to every variant ("dbcache,fbcache" or "all")
    chart: bool = True               # bench.png (needs matplotlib)
    subprocess_timeout: int = 1800


BENCH_KEYS = tuple(BenchConfig.__dataclass_fields__)

# One line per key, for --help (tests check that every key has one).
BENCH_KEY_DOCS = {
    "variants": "override sets compared with eager: 'LABEL=k=v k=v; k=v ...' or a list / mapping",
    "eager": "measure the eager baseline first (the ratios need it)",
    "warmup": "warm-up calls before timing (the first one compiles)",
    "repeat": "timed full pipeline calls (E2E median; it/s over all their steps)",
    "multiple_resolutions": "also time the first call at every shape of bench.resolutions",
    "resolutions": "sizes of the multiple-resolution pass, used for height and width (null: those of "
                   f"{SEED_RESOLUTIONS} the model takes)",
    "square_only": "only (r, r) shapes instead of every (height, width) pair",
    "resolution_steps": "denoising steps of each per-shape call (null: steps)",
    "cache_warmup": "first image from a shipped cache (sd3plugin-cache warm/pack/install/verify, fresh processes)",
    "cold_process": "also the cold first image in a fresh process with an empty cache",
    "fresh_cache": "compile each variant into an empty cache dir (true cold numbers)",
    "keep_caches": "keep those cache dirs under output_dir/caches",
    "quality": "error of latents and images against eager",
    "step_cache": "step-cache presets to add to every variant (LABEL+PRESET), compared with the uncached image "
                  "of the same seed: 'dbcache,fbcache' or all (docs/step-cache.md)",
    "chart": "bench.png (needs matplotlib)",
    "subprocess_timeout": "seconds a fresh process may take",
}


def bench_key_rows() -> list[tuple[str, str]]:
    """(bench.KEY, one line with its default) for --help."""
    import json

    defaults = BenchConfig()
    return [(f"bench.{key}", f"{BENCH_KEY_DOCS.get(key, '')} [default: {json.dumps(getattr(defaults, key))}]")
            for key in BENCH_KEYS]


def split_bench_overrides(argv: list[str]) -> tuple[BenchConfig, list[str]]:
    """Take ``bench.*`` overrides out of ``argv``; return the validated BenchConfig and the rest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    bench_args, rest = [], []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        (bench_args if key.startswith("bench.") and "=" in arg else rest).append(arg)
    values: dict = {}
    parser = OverridesParser.create()
    for arg in bench_args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "bench.step_cache" and "," in value and not value.startswith(("[", "'", '"')):
            arg = f"{key}=[{value}]"  # bench.step_cache=dbcache,fbcache: a list, not a Hydra sweep
        try:
            ov = parser.parse_overrides([arg.lstrip("+")])[0]
        except Exception as exc:
            raise ConfigError(f"cannot parse {arg!r}: {exc}") from None
        key = ov.key_or_group.split(".", 1)[1]
        if key not in BENCH_KEYS:
            raise ConfigError(f"unknown benchmark key bench.{key}; valid keys: "
                              + ", ".join(f"bench.{k}" for k in BENCH_KEYS))
        values[key] = ov.value()
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), values)
    except Exception as exc:
        raise ConfigError(f"invalid benchmark setting: {str(exc).splitlines()[0]}") from None
    bench = OmegaConf.to_object(cfg)
    parse_variants(bench.variants)  # fail early on a malformed variant list
    from .step_cache import step_cache_presets

    step_cache_presets(bench.step_cache)
    if bench.repeat < 1 or bench.warmup < 1:
        raise ConfigError(f"bench.repeat and bench.warmup must be at least 1 (got {bench.repeat}, "
                          f"{bench.warmup}): the first call compiles, the timed calls come after it")
    return bench, rest


def parse_variants(variants) -> list[tuple[str, list[str]]]:
    """[(label, overrides)] from ``"[LABEL=]k=v k=v; ..."`` (a string, or a list of such strings; Hydra
    needs each list element quoted) or a mapping label -> overrides."""
    if variants is None:
        return []
    if isinstance(variants, str):  # 'mode=default; fp8=quant=... mode=max-autotune'
        variants = [v for v in variants.split(";") if v.strip()]
    if isinstance(variants, dict):
        items = [(str(k), v) for k, v in variants.items()]
    elif isinstance(variants, (list, tuple)):
        items = [_labelled(str(v).strip()) for v in variants]
    else:
        raise ConfigError(f"bench.variants must be a list of override strings or a mapping label -> "
                          f"overrides, got {variants!r}")
    out = []
    for label, overrides in items:
        ovs = overrides.split() if isinstance(overrides, str) else [str(o) for o in overrides]
        for o in ovs:
            if "=" not in o:
                raise ConfigError(f"variant {label!r}: {o!r} is not an override (key=value)")
            if o.split("=", 1)[0].lstrip("+~") in SHARED_KEYS:
                raise ConfigError(f"variant {label!r} sets {o!r}; model, device, dtype and cache_dir are "
                                  "shared by all variants: set them once on the command line")
        out.append((label, ovs))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"bench.variants has duplicate labels {labels}; name them with LABEL=overrides")
    return out


def _labelled(text: str) -> tuple[str, str]:
    """(label, overrides) of one variant string: 'fp8=quant=x mode=y' (a first word with two '=') names
    the variant ``fp8``; otherwise the text is its own label."""
    first = text.split(None, 1)[0] if text else ""
    label, _, after = first.partition("=")
    if "=" in after and "." not in label:
        return label, text[len(label) + 1:]
    return text or "configured", text


def label_slug(label: str) -> str:
    """A variant label as a file name part (caches/<slug>, grid_<slug>.png)."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
    return keep.strip("_")[:60] or "variant"


def resolution_shapes(bench: BenchConfig, model: str) -> list[tuple[int, int]]:
    """The (height, width) pairs of the multiple-resolution pass: ``bench.resolutions`` checked against the
    model, or by default the seed's sizes that the model takes (its native size if it takes none)."""
    from ...models import check_resolution, default_resolution

    if bench.resolutions is None:
        sizes = [r for r in SEED_RESOLUTIONS if _takes(model, r)] or [default_resolution(model)]
    else:
        sizes = list(dict.fromkeys(int(r) for r in bench.resolutions))
    for r in sizes:
        check_resolution(model, r, r)
    if bench.square_only:
        return [(r, r) for r in sizes]
    return [(h, w) for h in sizes for w in sizes]


def _takes(model: str, size: int) -> bool:
    from ...models import check_resolution

    try:
        check_resolution(model, size, size)
    except ConfigError:
        return False
    return True


def check_shared_dtype(cfg, composed, device: str) -> None:
    """All variants run on one loaded pipeline: a variant whose quant preset needs another dtype (per-row
    fp8 wants bfloat16) is refused before anything loads, with the fix."""
    from ...config.resolve import resolve_dtype

    base = resolve_dtype(cfg.dtype, device, cfg.quant.type)
    for label, vcfg, _ in composed:
        need = resolve_dtype(vcfg.dtype, device, vcfg.quant.type)
        if need != base:
            raise ConfigError(f"variant {label!r} (quant={vcfg.quant.type}) needs dtype "
                              f"{str(need).split('.')[-1]} but the shared pipeline loads "
                              f"{str(base).split('.')[-1]}; set dtype={str(need).split('.')[-1]} on the command "
                              "line so that eager and every variant use it")
