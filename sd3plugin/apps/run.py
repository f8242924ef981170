"""``sd3plugin-run`` (also ``python -m sd3plugin``): generate images with the configured pipeline.

It is a Hydra app on ``conf/config.yaml``: overrides, ``--cfg job`` and ``-m`` multirun work as usual, and
the seed document's onediff flags (``--compiler-config '{...}'``) are translated to overrides. Config
errors end with one message and exit code 2, before any model loads; an output, image or cache folder that
cannot be written with exit code 8, before anything loads; Ctrl-C with one line and exit code 130 (the run
folder marked incomplete in its report.json, or removed when nothing was written yet). Each run gets a
folder of its own (``run_folder``).
"""
from __future__ import annotations

import logging
import os
import sys
import time

from omegaconf import DictConfig, OmegaConf

from ..config.compose import normalize_overrides
from ..errors import ConfigError, NotWritableError
from ..cli.exit_codes import EXIT

log = logging.getLogger("sd3plugin")

# Hydra flags that take a value (the value is not an override).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
# Hydra flags without a value.
_PLAIN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m",
                "--shell-completion", "-sc"}


def check_flags(argv: list[str], prog: str) -> None:
    """An unknown flag (``--foo``) is one line naming it, not Hydra's usage text."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if arg in _VALUE_FLAGS:
            skip = True
        elif arg.startswith("-") and flag not in _VALUE_FLAGS | _PLAIN_FLAGS:
            raise ConfigError(f"unknown flag {arg!r}; {prog} takes key=value overrides, the seed's flags and "
                              f"Hydra's (-m, --cfg job, --info): see {prog} --help")


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
    """Compose the config from the command line once before Hydra runs, to fail early and clearly; return it."""
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
    """Translate/validate ``argv``, settle the run folder and check what will be written, then run
    ``task(cfg)`` as a Hydra app on sd3plugin's config; ``--help`` prints ``help_text()`` (generated from the
    schema) instead. Ctrl-C anywhere ends with one line and exit code 130."""
    from .interrupt import deliver_dropped_interrupts

    prog = "sd3plugin-bench" if bench else "sd3plugin-run"
    deliver_dropped_interrupts()
    try:
        _run_hydra(task, argv, bench, help_text, prog)
    except KeyboardInterrupt as exc:
        interrupted(prog, exc)


def _run_hydra(task, argv, bench, help_text, prog) -> None:
    import hydra

    from ..config import schema
    from .run_folder import folder_overrides
    from .writable import check_run_outputs

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv):
        print(help_text())
        return
    try:
        argv = prepare_argv(argv, bench=bench)
        check_flags(argv, prog)
        if not any(a in ("--hydra-help", "--info", "-i") for a in argv):
            cfg = prevalidate(argv)
            _, multirun = split_overrides(argv)
            if bench and not any(a in ("--cfg", "-c") for a in argv):  # one process: refuse a parallel preset
                from ..config.parallel import check_parallel_process

                check_parallel_process(cfg)
            if not any(a in ("--cfg", "-c") for a in argv):
                check_run_outputs(cfg, image=not bench)
            argv = folder_overrides(argv, cfg, multirun)
    except ConfigError as exc:
        fail(exc, "usage")
    except NotWritableError as exc:
        fail(exc, "cannot_write")
    schema.register()
    sys.argv = [sys.argv[0]] + argv
    main_fn = hydra.main(config_path="pkg://sd3plugin.conf", config_name="config", version_base=None)(task)
    main_fn()


def fail(exc: Exception, code: str) -> None:
    """One line on stderr, then the documented exit code."""
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(EXIT[code])


def interrupted(prog: str, exc: BaseException) -> None:
    """Ctrl-C: one line naming what became of the run folder, exit code 130."""
    import signal

    from .run_folder import release_unused

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
    marked = getattr(exc, "report", None)
    if marked is not None:
        what = f"the run is marked incomplete in {marked}"
    else:
        removed, kept = release_unused()
        what = ("nothing was written" + (f" (its folder {removed[0]} is removed)" if removed else "")
                if not kept else f"what was written is in {kept[0]}")
    print(f"{prog}: interrupted (Ctrl-C); {what}", file=sys.stderr, flush=True)
    sys.exit(EXIT["interrupted"])


def generate(cfg: DictConfig) -> dict:
    """Load the pipeline through the hook, warm up (compile), generate, write images and the reports; a
    Ctrl-C leaves report.json marked incomplete."""
    from ..pipeline import output_dir

    out = output_dir(cfg)
    try:
        return _generate(cfg, out)
    except KeyboardInterrupt as exc:
        try:
            exc.report = mark_incomplete(out, cfg, "interrupted (Ctrl-C)")
        except OSError:  # the folder cannot take it (disk full...): the one line says what is there
            pass
        raise


def mark_incomplete(out, cfg, reason: str):
    """report.json (and report.md) of a run that did not finish: ``"complete": false`` and why."""
    import json

    from .run_report import write_atomic

    data = {"complete": False, "reason": reason, "output_dir": str(out.resolve()),
            "config": OmegaConf.to_container(cfg, resolve=False)}
    write_atomic(out / "report.json", json.dumps(data, indent=2, default=str))
    write_atomic(out / "report.md", f"# sd3plugin-run: incomplete\n\nThe run was {reason} before it "
                                    "finished. Its config is in report.json.\n")
    return out.resolve() / "report.json"


def _generate(cfg: DictConfig, out) -> dict:
    import sd3plugin

    from .interrupt import raise_if_dropped, step_check
    from .metrics import StepTimer, peak_memory_gib, reset_peak_memory
    from .run_report import image_paths, save_images, summary, versions, write_reports
    from ..config.resolve import resolve_device
    from ..pipeline import call_kwargs, load_pipeline, synchronize
    from ..progress import step_bar

    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    with sd3plugin.enabled(cfg):
        pipe = load_pipeline(cfg)
    load_s = time.perf_counter() - t0
    raise_if_dropped()

    reset_peak_memory(device)
    step_bar(pipe, "warm-up (the first step compiles)")
    t0 = time.perf_counter()
    pipe(**call_kwargs(cfg, output_type="latent"), callback_on_step_end=step_check)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    raise_if_dropped()

    timer = StepTimer(device)
    kwargs = call_kwargs(cfg)
    step_bar(pipe, "generating")
    timer.start()
    t0 = time.perf_counter()
    images = pipe(**kwargs, callback_on_step_end=lambda *a: timer(*a[:3], step_check(*a))).images
    synchronize(device)
    e2e_s = time.perf_counter() - t0
    raise_if_dropped()

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
    from .quiet_logs import route_known_warnings
    from .writable import check_run_outputs

    route_known_warnings()
    logging.getLogger("sd3plugin").setLevel(logging.INFO)
    try:
        validate(cfg)
        check_run_outputs(cfg)  # a swept output_dir / image_path / cache_dir is checked here
        check_hardware(cfg)  # before building or loading anything
        if _parallel_rank(cfg):
            from .parallel_run import generate_parallel

            generate_parallel(cfg)
            return
        generate(cfg)
    except ConfigError as exc:
        if _quiet_rank(cfg):
            sys.exit(EXIT["usage"])
        fail(exc, "usage")
    except NotWritableError as exc:
        fail(exc, "cannot_write")


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
