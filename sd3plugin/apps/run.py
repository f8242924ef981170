"""``sd3plugin-run`` (also ``python -m sd3plugin``): generate images with the configured pipeline.

It is a Hydra app on ``conf/config.yaml``: overrides, ``--cfg job`` and ``-m`` multirun work as usual, and
the seed document's onediff flags (``--compiler-config '{...}'``) are translated to overrides. Config
errors end with one message and exit code 2, before any model loads.
"""
from __future__ import annotations

import logging
import os
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


def prevalidate(argv: list[str]) -> DictConfig:
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
    return compose(None, plain)


def prepare_argv(argv: list[str], bench: bool = False) -> list[str]:
    from ..config.legacy import translate

    return normalize_overrides(translate(argv, bench=bench))


HELP_FLAGS = ("--help", "-h")


def run_help() -> str:
    from ..config.help import cli_help

    return cli_help("sd3plugin-run", "Generate images with a Stable Diffusion 3 pipeline that sd3plugin compiles. "
                    "The images, report.md and report.json go to output_dir (by default outputs/DATE/TIME); the "
                    "command ends with a summary naming them. A config mistake ends with one line and exit code 2, "
                    "before anything loads.",
                    extra=[("several GPUs for one image (docs/parallel.md)", [
                        ("parallel=PRESET", "xDiT (pip install \"sd3plugin[parallel]\"): sd3plugin-run checks the "
                         "GPUs, then starts one process per GPU as torch.distributed.run does; too few GPUs: one "
                         "line, exit 2"),
                        ("parallel.launch=print", "print that torch.distributed.run command instead of running it")])])


def run_hydra(task, argv: list[str] | None = None, bench: bool = False, help_text=run_help) -> None:
    """Translate/validate ``argv`` then run ``task(cfg)`` as a Hydra app on sd3plugin's config;
    ``--help`` prints ``help_text()`` (generated from the schema) instead."""
    import hydra

    from ..config import schema

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv):
        print(help_text())
        return
    try:
        argv = prepare_argv(argv, bench=bench)
        if not any(a in ("--hydra-help", "--info", "-i") for a in argv):
            cfg = prevalidate(argv)
            if bench and not any(a in ("--cfg", "-c") for a in argv):  # one process: refuse a parallel preset
                from ..config.parallel import check_parallel_process

                check_parallel_process(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    schema.register()
    sys.argv = [sys.argv[0]] + argv
    main_fn = hydra.main(config_path="pkg://sd3plugin.conf", config_name="config", version_base=None)(task)
    main_fn()


def generate(cfg: DictConfig) -> dict:
    """Load the pipeline through the hook, warm up (compile), generate, write images and the reports."""
    import sd3plugin

    from .metrics import StepTimer, peak_memory_gib, reset_peak_memory
    from .run_report import image_paths, save_images, summary, versions, write_reports
    from ..config.resolve import resolve_device
    from ..pipeline import call_kwargs, load_pipeline, output_dir, synchronize
    from ..progress import step_bar

    out = output_dir(cfg)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    with sd3plugin.enabled(cfg):
        pipe = load_pipeline(cfg)
    load_s = time.perf_counter() - t0

    reset_peak_memory(device)
    step_bar(pipe, "warm-up (the first step compiles)")
    t0 = time.perf_counter()
    pipe(**call_kwargs(cfg, output_type="latent"))
    synchronize(device)
    warmup_s = time.perf_counter() - t0

    timer = StepTimer(device)
    kwargs = call_kwargs(cfg)
    step_bar(pipe, "generating")
    timer.start()
    t0 = time.perf_counter()
    images = pipe(**kwargs, callback_on_step_end=timer).images
    synchronize(device)
    e2e_s = time.perf_counter() - t0

    paths = save_images(images, image_paths(len(images), cfg.image_path, out))
    rep = sd3plugin.report(pipe)
    composed = rep.pop("config", OmegaConf.to_container(cfg, resolve=True))
    result = {
        "images": paths, "output_dir": str(out.resolve()), "device": device, "load_seconds": round(load_s, 3),
        "warmup_seconds": round(warmup_s, 3), "iterations_per_second": round(timer.its, 3),
        "e2e_seconds": round(e2e_s, 3), "peak_memory_gib": round(peak_memory_gib(device), 3),
        "height": kwargs["height"], "width": kwargs["width"], "steps": kwargs["num_inference_steps"],
        "optimization": rep, "config": composed, "versions": versions(),
    }
    write_reports(result, out)
    print(summary(result, out), flush=True)
    return result


def _task(cfg: DictConfig) -> None:
    from ..config import check_hardware, validate

    logging.getLogger("sd3plugin").setLevel(logging.INFO)
    try:
        validate(cfg)
        check_hardware(cfg)  # before building or loading anything
        if _parallel_rank(cfg):
            from .parallel_run import generate_parallel

            generate_parallel(cfg)
            return
        generate(cfg)
    except ConfigError as exc:
        if not _quiet_rank(cfg):
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _quiet_rank(cfg: DictConfig) -> bool:
    """A rank other than 0 of a parallel run: rank 0 says the (same) config error, the others only exit."""
    from ..config.parallel import in_rank, is_parallel

    return is_parallel(cfg) and in_rank() and os.environ.get("RANK", "0") != "0"


def _parallel_rank(cfg: DictConfig) -> bool:
    """True in a rank of a parallel run (check_hardware refused a parallel config anywhere else)."""
    from ..config.parallel import is_parallel

    return is_parallel(cfg)


def main(argv: list[str] | None = None) -> None:
    from .parallel_launch import maybe_launch

    argv = list(sys.argv[1:] if argv is None else argv)
    maybe_launch(argv)  # parallel=...: starts the ranks, waits for them and exits
    run_hydra(_task, argv)


if __name__ == "__main__":
    main()
