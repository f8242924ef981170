"""--help of sd3plugin-run and sd3plugin-bench, generated from the schema; the mode table's module."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sd3plugin.config.key_docs import KEY_DOCS
from sd3plugin.config.legacy import _FLAGS, FLAG_DOCS
from sd3plugin.config.presets import GROUPS, group_options
from sd3plugin.config.schema import leaf_fields
from sd3plugin.models import ARCHITECTURES


def run_module(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_help():
    res = run_module("sd3plugin", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_every_key_and_flag_has_a_line():
    assert set(KEY_DOCS) == {key for key, _ in leaf_fields()}
    assert all(KEY_DOCS.values())
    assert set(FLAG_DOCS) == set(_FLAGS)


def test_run_help_lists_groups_presets_keys_and_seed_flags(run_help):
    assert run_help.startswith("usage: sd3plugin-run")
    for group in GROUPS:
        line = next(line for line in run_help.splitlines() if line.startswith(f"  {group} "))
        for preset in group_options(group):
            assert preset in run_help, (group, preset)
        assert "*" in line or group in ("quant", "parallel", "step_cache")  # the default is marked (these wrap to a second line)
    assert "default*" in run_help and "none*" in run_help
    for key, _ in leaf_fields():
        assert f"\n  {key} " in run_help or f"\n  {key}\n" in run_help, key
    assert "denoising steps [default: 28]" in run_help
    assert "[default: tiny]" in run_help and "[default: max-optimize:low-precision]" in run_help.replace(
        "[default:\n" + " " * 30, "[default: ")
    for flag in ("--compiler-config JSON", "--quantize-config JSON", "--saved-image PATH", "--cfg job"):
        assert flag in run_help
    for arch in ARCHITECTURES:
        assert arch in run_help
    assert "--run_multiple_resolutions" not in run_help  # a bench-only flag


def test_bench_help_adds_the_benchmark_keys():
    from sd3plugin.apps.bench.options import BENCH_KEY_DOCS, BENCH_KEYS

    assert set(BENCH_KEY_DOCS) == set(BENCH_KEYS)
    res = run_module("sd3plugin.apps.bench", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage: sd3plugin-bench")
    for key in BENCH_KEYS:
        assert f"  bench.{key} " in res.stdout, key
    assert "[default: 3]" in res.stdout and "--run_multiple_resolutions 0|1" in res.stdout


def test_modes_table_runs_as_a_module_without_a_runpy_warning():
    res = run_module("sd3plugin.config.modes_table")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RuntimeWarning" not in res.stderr
    assert res.stdout.startswith("| token |") and "| `max-optimize` |" in res.stdout
