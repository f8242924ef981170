"""``sd3plugin-bench``: eager against one or more configured variants, in one process, on the same inputs.

    sd3plugin-bench model=sd3-medium "bench.variants='mode=default; fp8=mode=max-autotune quant=fp8_e4m3_e4m3_dynamic'"
    sd3plugin-bench model=sd3-medium --compiler-config '{"mode": "max-optimize", "dynamic": true}' \
        --run_multiple_resolutions 1

Each variant is a set of overrides on top of the command line's config (``"LABEL=overrides"`` names it:
``'fp8=quant=fp8_e4m3_e4m3_dynamic mode=max-autotune'``; a plain ``mode=default`` is its own label). For
every variant it measures iteration speed (CUDA events between denoising steps, median), end-to-end time of
a full pipeline call (median of ``bench.repeat`` calls), peak memory, warm-up with compilation (first call,
fresh compile cache), warm-up from the cache that compile left (a fresh process), the error against eager
(latents and images) and, with ``bench.multiple_resolutions``, the first-call time and the number of new
graphs compiled at every shape. Results: ``bench.json``, ``bench.md`` and ``bench.png`` in output_dir.

``bench.*`` keys are the benchmark's own (see ``BenchConfig``); they are taken out of the command line
before Hydra composes the plugin config.

Modules: ``options`` (BenchConfig, argument parsing, the variant grammar), ``timing`` (step events, timed
calls), ``variants`` (one variant measured, the resolution sweep), ``coldstart`` (first images in fresh
processes), ``quality`` (error against eager), ``runner`` (the whole benchmark), ``report`` (bench.md/.json/.png).
"""
from __future__ import annotations

import logging
import sys

from ...errors import ConfigError, NotWritableError
from .coldstart import variant_command_overrides
from .options import (COMMAND_LINE, BenchConfig, check_shared_dtype, parse_variants, resolution_shapes,
                      split_bench_overrides)
from .runner import add_ratios, run_bench
from .timing import StepEvents

__all__ = ["main", "BenchConfig", "split_bench_overrides", "parse_variants", "resolution_shapes",
           "check_shared_dtype", "run_bench", "add_ratios", "StepEvents", "variant_command_overrides"]


def bench_help() -> str:
    from ...config.help import cli_help
    from .options import bench_key_rows

    return cli_help("sd3plugin-bench", "Measure eager and configured variants of a Stable Diffusion 3 pipeline "
                    "side by side (it/s, end-to-end time, peak memory, warm-up with compilation and from a shipped "
                    "cache, error against eager). bench.md, bench.json and bench.png go to output_dir (by "
                    "default outputs/DATE/TIME); the command ends by naming it.",
                    extra=[("benchmark keys (bench.KEY=VALUE)", bench_key_rows())], bench=True)


def _task_factory(bench: BenchConfig):
    def task(cfg) -> None:
        from ..quiet_logs import route_known_warnings
        from ..run import fail
        from ..writable import check_run_outputs
        from ...config import validate

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        route_known_warnings()
        logging.getLogger("sd3plugin").setLevel(logging.INFO)
        try:
            validate(cfg)
            check_run_outputs(cfg, image=False)
            run_bench(cfg, bench)
        except KeyboardInterrupt as exc:
            try:
                exc.report = mark_incomplete(cfg, "interrupted (Ctrl-C)")
            except OSError:  # the folder cannot take it: the one line says what is there
                pass
            raise
        except ConfigError as exc:
            fail(exc, "usage")
        except NotWritableError as exc:
            fail(exc, "cannot_write")
    return task


def mark_incomplete(cfg, reason: str):
    """bench.json of a benchmark that did not finish: the variants measured so far (if any) and
    ``"complete": false`` with why."""
    import json

    from ..run_report import write_atomic
    from ...pipeline import output_dir

    path = output_dir(cfg) / "bench.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"model": cfg.model, "variants": []}
    data.update(complete=False, reason=reason)
    write_atomic(path, json.dumps(data, indent=2, default=str))
    return path.resolve()


def main(argv: list[str] | None = None) -> None:
    from ..run import prepare_argv, run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    COMMAND_LINE[:] = argv
    try:
        bench, rest = split_bench_overrides(prepare_argv(argv, bench=True))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_hydra(_task_factory(bench), rest, bench=True, help_text=bench_help)
