"""``sd3plugin-run`` (also ``python -m sd3plugin``): generate images with the configured pipeline.

It is a Hydra app on ``conf/config.yaml``: overrides, ``--cfg job`` and ``-m`` multirun work as usual, and
the seed document's onediff flags (``--compiler-config '{...}'``) are translated to overrides. Config
errors end with one message and exit code 2, before any model loads.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from omegaconf import DictConfig, OmegaConf

from ..config.compose import normalize_overrides
from ..errors import ConfigError

log = logging.getLogger("sd3plugin")

# Hydra flags that take a value (the value is not an override).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def split_overrides(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides among ``argv`` (Hydra flags and their values left out), and whether -m is given."""
    overrides, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def prevalidate(argv: list[str]) -> None:
    """Compose the config from the command line once before Hydra runs, to fail early and clearly."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ..config import compose

    overrides, _ = split_overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)!r}: {exc}") from None
    # Sweeps (-m a=1,2) are checked value by value by Hydra; validate the plain overrides here.
    plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    compose(None, plain)


def prepare_argv(argv: list[str], bench: bool = False) -> list[str]:
    from ..config.legacy import translate

    return normalize_overrides(translate(argv, bench=bench))


def run_hydra(task, argv: list[str] | None = None, bench: bool = False) -> None:
    """Translate/validate ``argv`` then run ``task(cfg)`` as a Hydra app on sd3plugin's config."""
    import hydra

    from ..config import schema

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = prepare_argv(argv, bench=bench)
        if not any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in argv):
            prevalidate(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    schema.register()
    sys.argv = [sys.argv[0]] + argv
    main_fn = hydra.main(config_path="pkg://sd3plugin.conf", config_name="config", version_base=None)(task)
    main_fn()


def generate(cfg: DictConfig) -> dict:
    """Load the pipeline through the hook, warm up (compile), generate, write images and the report."""
    import sd3plugin

    from .metrics import StepTimer, peak_memory_gib, reset_peak_memory
    from ..config.resolve import resolve_device
    from ..pipeline import call_kwargs, load_pipeline, output_dir, synchronize

    out = output_dir(cfg)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    with sd3plugin.enabled(cfg):
        pipe = load_pipeline(cfg)
    load_s = time.perf_counter() - t0

    reset_peak_memory(device)
    t0 = time.perf_counter()
    pipe(**call_kwargs(cfg, output_type="latent"))  # warm-up: compiles on first use
    synchronize(device)
    warmup_s = time.perf_counter() - t0

    timer = StepTimer(device)
    kwargs = call_kwargs(cfg)
    timer.start()
    t0 = time.perf_counter()
    images = pipe(**kwargs, callback_on_step_end=timer).images
    synchronize(device)
    e2e_s = time.perf_counter() - t0

    paths = []
    for i, image in enumerate(images):
        path = out / f"image_{i:02d}.png"
        image.save(path)
        paths.append(str(path))
    rep = sd3plugin.report(pipe)
    composed = rep.pop("config", OmegaConf.to_container(cfg, resolve=True))
    result = {
        "images": paths, "device": device, "load_seconds": round(load_s, 3),
        "warmup_seconds": round(warmup_s, 3), "iterations_per_second": round(timer.its, 3),
        "e2e_seconds": round(e2e_s, 3), "peak_memory_gib": round(peak_memory_gib(device), 3),
        "height": kwargs["height"], "width": kwargs["width"], "steps": kwargs["num_inference_steps"],
        "optimization": rep, "config": composed, "versions": versions(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.md").write_text(report_markdown(result))
    print(report_markdown(result))
    return result


def versions() -> dict:
    import platform

    import diffusers
    import torch

    import sd3plugin

    info = {"sd3plugin": sd3plugin.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def report_markdown(result: dict) -> str:
    opt = result["optimization"]
    rows = [
        ("backend", f"{opt.get('backend')} ({opt.get('backend_reason')})"),
        ("mode", f"`{opt.get('mode', {}).get('spec')}`"),
        ("status", opt.get("status")),
        ("resolution / steps", f"{result['width']}x{result['height']}, {result['steps']} steps"),
        ("warm-up incl. compile", f"{result['warmup_seconds']:.2f} s"),
        ("iteration speed", f"{result['iterations_per_second']:.2f} it/s"),
        ("end-to-end", f"{result['e2e_seconds']:.2f} s"),
        ("peak memory", f"{result['peak_memory_gib']:.3f} GiB ({'GPU' if result['device'] == 'cuda' else 'CPU RSS'})"),
        ("device", result["versions"].get("gpu") or result["device"]),
    ]
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _task(cfg: DictConfig) -> None:
    from ..config import check_hardware, validate

    logging.getLogger("sd3plugin").setLevel(logging.INFO)
    try:
        validate(cfg)
        check_hardware(cfg)  # before building or loading anything
        generate(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    run_hydra(_task, argv)


if __name__ == "__main__":
    main()
