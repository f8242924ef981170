"""parallel=... (xDiT, docs/parallel.md) on CPU: the presets, the pure checks, the one-line refusals, the
launch command, what xDiT's path does not keep, the fingerprint's parallel part and the xfuser seam.

What needs GPUs (the ranks, CFG-parallel equality with the one-process image) is scripts/parallel_bench.sh:
xfuser 0.7.0 does not import without an accelerator, so no CPU process group can run its pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3plugin.cache.manifest import compile_config, fingerprint
from sd3plugin.config import check_hardware, compose
from sd3plugin.config.parallel import (PARALLEL_PRESETS, RANK_ENV, adjustments, check_parallel_gpus, world_size,
                                       xfuser_args)
from sd3plugin.config.presets import group_options
from sd3plugin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def outside_rank(monkeypatch):
    for var in RANK_ENV + ("RANK",):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def in_a_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")


def test_the_group_is_generated_from_the_table_and_defaults_to_none():
    import math

    from sd3plugin.config.parallel import preset_node

    assert group_options("parallel") == sorted(PARALLEL_PRESETS)
    assert compose().parallel.name == "none" and world_size(compose().parallel) == 1
    cfg = compose(overrides=["parallel=cfg2-ulysses2"]).parallel
    assert (cfg.cfg, cfg.ulysses, cfg.ring, cfg.pipefusion, world_size(cfg)) == (True, 2, 1, 1, 4)
    for name, preset in PARALLEL_PRESETS.items():
        node = preset_node(name)
        assert (node["cfg"], node["ulysses"], node["ring"], node["pipefusion"]) == (
            preset.cfg, preset.ulysses, preset.ring, preset.pipefusion)
        # the name says the world size: cfg2-ulysses2 -> 2 x 2
        factors = [int("".join(c for c in part if c.isdigit()) or 1) for part in name.split("-")]
        assert preset.world_size == math.prod(factors), name


def test_keys_combine_beyond_the_presets():
    cfg = compose(overrides=["parallel.ulysses=2", "parallel.pipefusion=2", "parallel.patches=4"]).parallel
    assert world_size(cfg) == 4 and cfg.patches == 4


@pytest.mark.parametrize("overrides, says", [
    (["parallel=cfg2", "device=cpu"], "parallel=cfg2 runs on 2 CUDA GPUs through xDiT but device=cpu; use device=auto"),
    (["parallel=cfg2", "guidance_scale=1.0"], "guidance_scale=1.0 runs no unconditional half; set guidance_scale "
                                              "above 1 or parallel.cfg=false"),
    (["parallel=ulysses4", "model=sd3.5-large"], "38 is not a multiple of 4"),
    (["parallel.patches=4"], "parallel.patches=4 is PipeFusion's patch count but parallel.pipefusion=1"),
    (["parallel=pipefusion4", "parallel.patches=2"], "must be at least parallel.pipefusion=4"),
    (["parallel.ring=0"], "parallel.ring=0 must be at least 1"),
    (["parallel.launch=later"], "parallel.launch='later' is not valid; choose one of: auto, print"),
    (["parallel=cfg3"], "unknown parallel option 'cfg3'; valid options: cfg2,"),
])
def test_contradictions_fail_at_composition(overrides, says):
    with pytest.raises(ConfigError, match=None) as err:
        compose(overrides=overrides)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_too_few_gpus_is_one_line_naming_the_fix():
    cfg = compose(overrides=["parallel=cfg2-ulysses2"])
    for gpus, have in ((0, "no CUDA GPU"), (1, "1 CUDA GPU"), (3, "3 CUDA GPUs")):
        with pytest.raises(ConfigError) as err:
            check_parallel_gpus(cfg, gpus)
        assert str(err.value) == (f"parallel=cfg2-ulysses2 needs 4 CUDA GPUs (one process each) but this machine "
                                  f"has {have}; run it on a machine with 4 GPUs or use parallel=none")
    check_parallel_gpus(cfg, 4)
    check_parallel_gpus(compose(), 0)


def test_keys_that_are_not_a_preset_are_named_by_their_values():
    cfg = compose(overrides=["parallel=cfg2", "parallel.ring=2"])
    with pytest.raises(ConfigError, match=r"^parallel.cfg=true parallel.ring=2 needs 4 CUDA GPUs"):
        check_parallel_gpus(cfg, 2)


def test_a_parallel_config_runs_only_in_the_ranks(outside_rank, monkeypatch):
    cfg = compose(overrides=["parallel=cfg2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="only `sd3plugin-run parallel=cfg2` starts"):
        check_hardware(cfg)  # what bench, cache warm/verify and the hook's plan call
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert check_hardware(cfg) == "cuda"


def test_launch_command_and_when_there_is_nothing_to_launch(outside_rank, monkeypatch):
    from sd3plugin.apps.parallel_launch import launch_command, plan_launch

    assert launch_command(["parallel=cfg2", "steps=4"], 2, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sd3plugin.apps.run",
        "parallel=cfg2", "steps=4"]
    cfg, cmd = plan_launch(["parallel=cfg2-ulysses2", "parallel.launch=print", "prompt=a b"])
    assert cmd[4] == "--nproc-per-node=4" and cmd[7:] == ["parallel=cfg2-ulysses2", "prompt=a b"]
    assert plan_launch(["steps=2"]) is None and plan_launch(["parallel=none"]) is None
    assert plan_launch(["parallel=cfg2", "--cfg", "job"]) is None and plan_launch(["parallel=cfg2", "--help"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert plan_launch(["parallel=cfg2"]) is None  # a rank runs the parallel path itself


def test_launch_print_prints_the_one_command(outside_rank, capsys):
    from sd3plugin.apps.parallel_launch import maybe_launch

    with pytest.raises(SystemExit) as done:
        maybe_launch(["parallel=ring2", "parallel.launch=print", "prompt=a corgi"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 -m "
                   "sd3plugin.apps.run parallel=ring2 'prompt=a corgi'"]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs: it would start the ranks")
def test_sd3plugin_run_refuses_a_parallel_preset_without_the_gpus_before_anything_loads(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SD3PLUGIN_CACHE_DIR": str(tmp_path / "cache")}
    for var in RANK_ENV:
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-m", "sd3plugin", "parallel=cfg2", "model=sd3-medium"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "error: parallel=cfg2 needs 2 CUDA GPUs (one process each) but this machine has "
        f"{'no CUDA GPU' if torch.cuda.device_count() == 0 else '1 CUDA GPU'}; run it on a machine with 2 GPUs "
        "or use parallel=none"]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "outputs").exists()  # nothing loaded or written


def test_a_rank_checks_its_world_and_the_machine_before_loading(in_a_rank, monkeypatch):
    from sd3plugin.apps import parallel_launch
    from sd3plugin.apps.parallel_run import check_rank

    cfg = compose(overrides=["parallel=cfg2"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"^parallel=cfg2 needs 2 processes but torch.distributed.run started 1; "
                                          r"start it with --nproc-per-node=2"):
        check_rank(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(parallel_launch, "gpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 CUDA GPUs .* but this machine has 1 CUDA GPU"):
        check_rank(cfg)
    monkeypatch.setattr(parallel_launch, "gpu_count", lambda: 2)
    monkeypatch.setattr("sd3plugin.compat.xfuser.unavailable", lambda: "xfuser is not installed (xfuser)")
    with pytest.raises(ConfigError) as err:
        check_rank(cfg)
    assert str(err.value) == ('parallel=cfg2 runs through xDiT but xfuser is not installed (xfuser); '
                              'pip install "sd3plugin[parallel]" (xfuser 0.7)')


@pytest.mark.slow
def test_the_ranks_run_as_torchrun_runs_them_and_a_failure_is_one_line(capfd):
    from sd3plugin.apps.parallel_launch import run_ranks

    program = ("import os, sys; assert os.environ['WORLD_SIZE'] == '2' and 'TORCHELASTIC_RUN_ID' in os.environ; "
               "print('rank', os.environ['RANK']); sys.exit(int(sys.argv[1]) if os.environ['RANK'] == '1' else 0)")
    assert run_ranks(2, ["-c", program, "0"]) == 0
    assert sorted(capfd.readouterr().out.split()) == ["0", "1", "rank", "rank"]
    assert run_ranks(2, ["-c", program, "2"]) == 2  # a ConfigError: the rank said it
    assert capfd.readouterr().err.strip() == ""
    assert run_ranks(2, ["-c", program, "3"]) == 3
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: rank 1 of 2 ended with exit code 3; its output is above"]


def test_each_change_xdit_does_not_keep_has_its_line():
    cfg = compose(overrides=["parallel=ulysses2", "mode=O3", "attention=fa4", "backend=nexfort"])
    lines = {a.key: a.line for a in adjustments(cfg)}
    assert set(lines) == {"backend", "fuse_qkv", "attention", "mode.spec"}
    assert lines["fuse_qkv"].startswith("fuse_qkv: not kept under parallel=ulysses2: xDiT's attention processor")
    assert lines["attention"].startswith("attention=fa4: not kept under parallel=ulysses2")
    assert lines["backend"].startswith("backend=nexfort: not kept") and "backend=inductor" in lines["backend"]
    assert lines["mode.spec"].startswith("mode token cudagraphs: not kept under parallel=ulysses2")
    assert [a.key for a in adjustments(compose(overrides=["parallel=cfg2", "mode=max-speed"]))] == [
        "fuse_qkv", "mode.spec"]
    assert [a.key for a in adjustments(compose(overrides=["parallel=cfg2", "mode=default"]))] == ["fuse_qkv"]
    assert adjustments(compose(overrides=["parallel=cfg2", "fuse_qkv=false"])) == []
    assert adjustments(compose(overrides=["attention=fa4"])) == []  # one process keeps everything


def test_a_rank_runs_the_config_without_what_is_not_kept():
    from sd3plugin.apps.parallel_run import effective_config

    cfg = compose(overrides=["parallel=ring2", "mode=O3", "attention=int8"])
    run_cfg, notes = effective_config(cfg)
    assert (run_cfg.fuse_qkv, str(run_cfg.attention)) == (False, "sdpa") and len(notes) == 3
    assert "cudagraphs" not in run_cfg.mode.spec and "max-autotune" in run_cfg.mode.spec
    assert cfg.fuse_qkv is True  # the composed config is left as it was


def test_fingerprint_has_a_parallel_part_per_rank_and_none_for_one_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "parallel" not in compile_config(compose())
    cfg = compose(overrides=["parallel=pipefusion2"])
    monkeypatch.setenv("RANK", "0")
    first = compile_config(cfg)["parallel"]
    assert first == {"cfg": False, "ulysses": 1, "ring": 1, "pipefusion": 2, "patches": None, "rank": 0}
    fp0 = fingerprint(cfg)
    monkeypatch.setenv("RANK", "1")
    assert fingerprint(cfg) != fp0 != fingerprint(compose())


def test_xfuser_arguments_follow_the_config():
    cfg = compose(overrides=["parallel=cfg2-pipefusion2", "parallel.patches=4", "steps=9", "prompt=a fox",
                             "guidance_scale=4.5", "seed=3"])
    args = xfuser_args(cfg, 1024, 768)
    assert {k: args[k] for k in ("use_cfg_parallel", "ulysses_degree", "ring_degree", "pipefusion_parallel_degree",
                                 "num_pipeline_patch", "height", "width", "num_inference_steps", "guidance_scale",
                                 "seed", "prompt", "use_torch_compile")} == {
        "use_cfg_parallel": True, "ulysses_degree": 1, "ring_degree": 1, "pipefusion_parallel_degree": 2,
        "num_pipeline_patch": 4, "height": 1024, "width": 768, "num_inference_steps": 9, "guidance_scale": 4.5,
        "seed": 3, "prompt": "a fox", "use_torch_compile": False}


def _xfuser_source(relative: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("xfuser")  # finds the package without importing it
    return None if spec is None else Path(spec.submodule_search_locations[0], relative).read_text()


def test_the_private_xfuser_names_the_seam_uses_are_there():
    from sd3plugin.compat import xfuser as xf

    source = _xfuser_source("model_executor/layers/attention_processor.py")
    if source is None:
        pytest.skip("xfuser is not installed (pip install \".[parallel]\")")
    assert "_XFUSER_ATTENTION_PROCESSOR_MAPPING" in source and "class xFuserJointAttnProcessor2_0" in source
    assert "def destroy_distributed_env" in _xfuser_source("core/distributed/runtime_state.py")
    assert xf.version() == xf.TESTED_VERSION


@pytest.mark.slow
def test_xfuser_seam_says_why_it_cannot_run_here():
    from sd3plugin.compat import xfuser as xf

    why = xf.unavailable()  # imports xfuser (transformers, diffusers...): seconds
    if _xfuser_source("__init__.py") is None:
        assert why.startswith("xfuser is not installed")
    elif not torch.cuda.is_available():
        assert why == ("xfuser does not import here: No Accelerators(AMD/NV/MTT GPU, AMD MI instinct accelerators) "
                       "available")
    else:
        assert why is None
