"""The nexfort backend on CPU, in the nexfort environment (scripts/nexfort-env.sh; skipped elsewhere).

Two processes share one cache_dir: the first compiles cold, the second must reuse nexfort's graph cache
and compile faster. Both run the tiny pipeline through the hook with mode max-optimize:max-autotune:
low-precision and must exit with code 0 (no licensed nexfort module ran) and match eager.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import sd3plugin
from sd3plugin import environment
from sd3plugin.errors import CompileError

NEXFORT_OK, NEXFORT_WHY = environment.nexfort_status() if environment.dist_version("nexfort") else (False, "")
pytestmark = [pytest.mark.nexfort,
              pytest.mark.skipif(not NEXFORT_OK, reason=f"nexfort not usable here: {NEXFORT_WHY or 'not installed'}")]

REPO = Path(__file__).resolve().parents[2]
# fp32 on CPU: nexfort's inductor kernels reorder float sums (measured: 3e-6 of latents of size ~4);
# a wrong graph differs by order 1. Relative to the largest eager value:
RTOL = 1e-4
# The warm process must spend at most this share of the cold process's first call (measured here on
# 2 CPU cores: cold 50-75 s, warm 13-20 s, about 0.25).
WARM_SHARE = 0.6


def _run(tiny_path, cache_dir, out, *overrides):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(environment.LICENCE_ENV, None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.nexfort.run_tiny", str(tiny_path), str(cache_dir),
                           str(out), *overrides], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=900)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    result = json.loads(Path(out).read_text())
    result["wall_s"] = wall
    return result


def _graph_entries(cache_dir) -> set[str]:
    root = Path(cache_dir) / "inductor" / "compiledgraph"
    return {p.parent.name for p in root.glob("*/entry")} if root.is_dir() else set()


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("nexfort-cache")
    cold = _run(tiny_path, cache_dir, cache_dir.parent / "cold.json")
    entries_cold = _graph_entries(cache_dir)
    warm = _run(tiny_path, cache_dir, cache_dir.parent / "warm.json")
    print(f"\nnexfort tiny pipeline on CPU: cold first call {cold['first_call_s']:.1f} s "
          f"(process {cold['wall_s']:.1f} s), warm {warm['first_call_s']:.1f} s (process {warm['wall_s']:.1f} s)")
    return {"cold": cold, "warm": warm, "entries_cold": entries_cold, "entries_warm": _graph_entries(cache_dir),
            "cache_dir": cache_dir}


def test_cold_process_compiles_with_nexfort_matches_eager_and_exits_0(runs):
    cold = runs["cold"]
    rep = cold["report"]
    assert rep["status"] == "compiled" and rep["backend"] == "nexfort", rep
    assert rep["compiled_modules"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert rep["nexfort_options"] == {"mode": "max-optimize:max-autotune:low-precision", "dynamic": False}
    assert cold["max_abs_diff"] <= RTOL * cold["eager_max_abs"], cold
    assert cold["repeat_max_abs_diff"] == 0.0
    assert cold["licensed_after_imports"] == [] and cold["licensed_at_end"] == []
    assert runs["entries_cold"], "nexfort wrote no compiled-graph cache entry under cache_dir"
    assert rep["nexfort_graph_cache_dir"].startswith(str(runs["cache_dir"]))


def test_warm_process_reuses_the_cache_and_compiles_faster(runs):
    cold, warm = runs["cold"], runs["warm"]
    assert warm["report"]["status"] == "compiled" and warm["max_abs_diff"] <= RTOL * warm["eager_max_abs"]
    assert runs["entries_warm"] == runs["entries_cold"], "the warm process compiled new graphs"
    assert warm["first_call_s"] < WARM_SHARE * cold["first_call_s"], (warm["first_call_s"], cold["first_call_s"])


def test_auto_picks_nexfort_here(tiny_path, cache_dir):
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=[f"cache_dir={cache_dir}", "backend=auto"])
    rep = sd3plugin.report(pipe)
    assert rep["backend"] == "nexfort" and rep["backend_reason"].startswith("auto: nexfort imports and matches")
    sd3plugin.undo(pipe)


def test_undo_restores_the_module_exactly(tiny_path, cache_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    tr = pipe.transformer
    before = {k: (v.data_ptr(), v.stride()) for k, v in tr.state_dict().items()}
    conv = tr.pos_embed.proj.weight
    sd3plugin.optimize(pipe, overrides=[f"cache_dir={cache_dir}", "backend=nexfort", "memory_format=channels_last",
                                        "fuse_qkv=false"])
    assert sd3plugin.report(pipe)["status"] == "compiled"
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(b._compiled_call_impl is not None for b in tr.transformer_blocks)
    sd3plugin.undo(pipe)
    assert all(b._compiled_call_impl is None for b in tr.transformer_blocks)
    assert {k: (v.data_ptr(), v.stride()) for k, v in tr.state_dict().items()} == before
    assert "forward" not in tr.__dict__


def test_unknown_nexfort_option_is_named(tiny_path, cache_dir):
    with pytest.raises(CompileError, match=r"unknown nexfort option\(s\) \['no_such_option'\]"):
        sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                           overrides=[f"cache_dir={cache_dir}", "backend=nexfort", "on_error=raise",
                                      "+backend_options.no_such_option=1"])


def test_layout_is_fixed_both_import_paths_work():
    """nexfort imports its codegen extension as nexfort.inductor.codegen.* (compiled calls) and as a
    top-level module (nexfort/kernels); the wheel only provides the second (onediff#1189)."""
    import importlib

    assert environment.misplaced_nexfort_modules() == []
    importlib.import_module("nexfort.inductor.codegen.nexfort_codegen_extension")
    importlib.import_module("nexfort.kernels.utils")
    assert environment.licensed_modules_loaded() == []


def test_seed_mode_with_freezing_compiles_without_the_graph_cache(tiny_path, tmp_path):
    """The seed's full mode string: nexfort refuses NEXFORT_GRAPH_CACHE=1 together with freezing, so the
    backend turns its graph cache off for it (else: fallback with "Freezing can embed constants").
    In a process of its own, so that this test's compiled kernels do not speed up later tests."""
    run = _run(tiny_path, tmp_path / "cache", tmp_path / "seed.json", "mode=seed")
    rep = run["report"]
    assert rep["status"] == "compiled" and rep["nexfort_graph_cache_dir"] is None, rep
    assert "freezing" in rep["nexfort_options"]["mode"] and run["env_graph_cache"] == "0"
    assert run["max_abs_diff"] <= RTOL * run["eager_max_abs"], run
    assert run["licensed_at_end"] == []
