"""Everyday mistakes with the commands, run as a user runs them (subprocesses): one line naming the problem
and the fix, the documented exit code, no traceback, nothing built or written that the user did not ask for."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3plugin import environment
from sd3plugin.cli.exit_codes import EXIT

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def cache_cli(*args: str, cwd, env=None) -> subprocess.CompletedProcess:
    return run(["-m", "sd3plugin.cli.cache", *args], cwd, env)


def one_line(res: subprocess.CompletedProcess, prefix: str) -> str:
    """The one error line starting with ``prefix`` (and no traceback anywhere)."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


OFFLINE = {"HF_HUB_OFFLINE": "1"}


# -- verify: model mistakes are exit 2, as in run and warm ----------------------------------------------
def _verify_model(tmp_path, model):
    cache = tmp_path / "cache"
    res = cache_cli("verify", f"model={model}", "--cache-dir", str(cache), cwd=tmp_path,
                    env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == EXIT["usage"], (res.returncode, res.stderr[-3000:])
    assert not cache.exists()  # refused before the cache was looked at
    return one_line(res, "sd3plugin-cache verify: ")


def test_verify_of_a_missing_model_folder_is_exit_2(tmp_path):
    line = _verify_model(tmp_path, tmp_path / "models" / "sd3")
    assert "is neither a folder with model_index.json nor a Hub id (no such folder)" in line
    assert "no cache entry" not in line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_model_index", "offline_hub_id"])
def test_verify_of_a_folder_without_model_index_or_an_offline_hub_id_is_exit_2(case, tmp_path):
    if case == "no_model_index":
        (tmp_path / "weights").mkdir()
        (tmp_path / "weights" / "transformer").mkdir()
        line = _verify_model(tmp_path, tmp_path / "weights")
        assert "folder without model_index.json" in line
    else:
        line = _verify_model(tmp_path, "someorg/somemodel")
        assert "nor a reachable Hub id" in line and "hf download someorg/somemodel" in line


@pytest.mark.slow
def test_verify_cold_reports_the_child_error_in_one_line(tmp_path):
    """A folder that is not a complete SD3 pipeline fails in the verify process: a model mistake, exit 2 in
    one line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    res = cache_cli("verify", "--cold", f"model={bad}", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == EXIT["usage"], res.stderr[-3000:]
    line = one_line(res, "sd3plugin-cache verify: ")
    assert "the folder could not be loaded as an SD3 pipeline" in line and "complete diffusers folder" in line


# -- an explicit choice that cannot run here: exit 2 before anything loads -------------------------------
def test_check_runnable_refuses_explicit_choices_and_lets_auto_choose(tmp_path):
    from sd3plugin.config import compose
    from sd3plugin.errors import ConfigError
    from sd3plugin.preflight import check_runnable

    base = ["model=tiny", "device=cpu", f"cache_dir={tmp_path}"]
    reasons = check_runnable(compose(None, base))
    assert reasons["backend"].startswith("auto: ") and reasons["attention"].startswith("auto: sdpa")
    for override, words in [("attention=fa4", "attention=fa4 cannot run: FA4 needs a CUDA GPU"),
                            ("attention=fa3_fp8", "attention=fa3_fp8 cannot run"),
                            ("quant=fp8_e4m3_e4m3_dynamic_per_tensor", "needs an NVIDIA GPU")]:
        with pytest.raises(ConfigError, match=words):
            check_runnable(compose(None, [*base, override]))
    assert "diffusers" in check_runnable(compose(None, [*base, "backend=eager", "attention=fa4"]))["attention"]
    if not environment.nexfort_status()[0]:
        with pytest.raises(ConfigError, match="backend=nexfort cannot run here: .*; use backend=auto"):
            check_runnable(compose(None, [*base, "backend=nexfort"]))
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, words", [
    ("backend=nexfort", "backend=nexfort cannot run here"),
    ("attention=fa4", "attention=fa4 cannot run"),
])
def test_run_with_an_explicit_choice_that_cannot_run_is_exit_2_before_loading(override, words, tmp_path):
    if override == "backend=nexfort" and environment.nexfort_status()[0]:
        pytest.skip("nexfort runs here")
    if override == "attention=fa4" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    cache = tmp_path / "cache"
    res = run(["-m", "sd3plugin", "model=tiny", override, f"cache_dir={cache}", f"output_dir={tmp_path / 'out'}"],
              tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res, "error: ")
    assert words in line and ("use backend=auto" in line or "Use attention=auto" in line)
    assert not (cache / "models").exists()  # nothing was built or loaded


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: fa4 may run")
def test_warm_with_a_kernel_that_cannot_run_is_exit_2_and_creates_no_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    res = cache_cli("warm", "attention=fa4", "--cache-dir", str(cache), cwd=tmp_path)
    assert res.returncode == EXIT["usage"], res.stderr[-3000:]
    assert "attention=fa4 cannot run" in one_line(res, "sd3plugin-cache warm: ")
    assert not cache.exists()


# -- pack refuses a cache dir without entries -----------------------------------------------------------
def test_pack_of_a_cache_without_entries_is_refused_with_the_fix(tmp_path):
    cache = tmp_path / "cache"
    (cache / "inductor" / "fxgraph").mkdir(parents=True)  # what sd3plugin-run leaves: compiled files only
    (cache / "inductor" / "fxgraph" / "graph").write_bytes(b"x")
    archive = tmp_path / "cache.tar.zst"
    res = cache_cli("pack", "--cache-dir", str(cache), "-o", str(archive), cwd=tmp_path)
    assert res.returncode == EXIT["not_found"], res.stderr
    line = one_line(res, "sd3plugin-cache pack: ")
    assert "has no cache entries" in line and "sd3plugin-cache warm" in line
    assert not archive.exists()
    assert (cache / "inductor" / "fxgraph" / "graph").read_bytes() == b"x"  # nothing the user had is lost


# -- one shared set of flags ----------------------------------------------------------------------------
def test_every_subcommand_takes_json_and_cache_dir(tmp_path):
    from sd3plugin.cli.cache import COMMANDS, build_parser

    parser = build_parser()
    required = {"pack": ["-o", "x"], "install": ["archive"], "info": ["archive"], "keygen": ["-o", "k"]}
    for name in COMMANDS:
        args = parser.parse_args([name, *required.get(name, []), "--json", "--cache-dir", str(tmp_path)])
        assert args.json is True and args.cache_dir == str(tmp_path), name
    res = cache_cli("keygen", "-o", str(tmp_path / "k"), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.pub").is_file() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_doctor_reports_the_cache_dir_it_is_given(tmp_path):
    res = cache_cli("doctor", "--json", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["cache"]["dir"] == str(tmp_path / "cache")


# -- sensitivity without scikit-image ----------------------------------------------------------------------
def test_sensitivity_without_scikit_image_names_the_bench_extra(tmp_path):
    hide = tmp_path / "hide" / "skimage"  # an import of skimage fails, as where it is not installed
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('No module named skimage')\n")
    out = tmp_path / "s.json"
    res = run(["-m", "sd3plugin.apps.quality", "sensitivity", "--model", "tiny", "--out", str(out)], tmp_path,
              env={"PYTHONPATH": str(hide.parent)})
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res, "error: ")
    assert "scikit-image" in line and "bench extra" in line and ".[bench]" in line
    assert not out.exists()
    assert "`bench`" in (ROOT / "docs" / "quantization.md").read_text()


# -- help and docs name every value -----------------------------------------------------------------------
def test_help_lists_every_value_of_every_choice_table():
    from sd3plugin.config import choices, schema
    from sd3plugin.config.help import cli_help
    from sd3plugin.models import ARCHITECTURES

    raw = cli_help("sd3plugin-run", "summary")
    text = " ".join(raw.split())
    for key, table in [("attention", choices.ATTENTION_KERNELS), ("backend", schema.BACKENDS),
                       ("device", choices.DEVICES), ("dtype", choices.DTYPES), ("on_error", choices.ON_ERROR)]:
        # the key's own row: a line that starts with the key, up to its default
        start = re.search(rf"^\s+{re.escape(key)}\s", raw, re.M)
        assert start, (key, raw)
        row = " ".join(raw[start.end():].split("[default:")[0].split())
        for value in table:
            assert f" {value} " in f" {row.replace('|', ' ').replace('(', ' ')} ", (key, value, row)
    assert "fa3 | fa3_fp8" in text
    for name in ARCHITECTURES:
        assert name in text


def test_docs_config_describes_every_model_preset():
    from sd3plugin.models import ARCHITECTURES

    row = next(ln for ln in (ROOT / "docs" / "config.md").read_text().splitlines() if ln.startswith("| `model` |"))
    for name in ARCHITECTURES:
        assert f"`{name}`" in row, name


# -- the GPU scripts on a CPU ------------------------------------------------------------------------------
GPU_SCRIPTS = [["scripts/attn_bench.py", "--out", "attn.json"], ["scripts/lora_bench.py"],
               ["scripts/step_profile.py", "out.json"], ["scripts/warm_start_trace.py", "out.json"]]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the scripts would measure")
@pytest.mark.parametrize("script", GPU_SCRIPTS + [["scripts/gpu_bench.sh", "env"], ["scripts/startup_bench.sh"]],
                         ids=lambda s: s[0].split("/")[1])
def test_gpu_scripts_end_in_one_line_on_a_cpu(script, tmp_path):
    path = ROOT / script[0]
    if path.suffix == ".sh":
        env = dict(os.environ, OUT=str(tmp_path / "out"), ROOT=str(tmp_path), PYTHONPATH=str(ROOT))
        res = subprocess.run(["bash", str(path), *script[1:]], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    else:
        res = run([str(path), *script[1:]], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res, "error: ")
    assert "CUDA GPU" in line and "GPU machine" in line
    assert not (tmp_path / "attn.json").exists() and not (tmp_path / "out.json").exists()


def test_a_verify_process_that_fails_is_told_in_one_line():
    """What the parent makes of the verify process's end: its ConfigError (exit 2), its error line, or the
    last line of a crash (not -X importtime's lines)."""
    from types import SimpleNamespace

    from sd3plugin.apps.verify import ERROR_MARK, child_failure
    from sd3plugin.cache.errors import CacheError
    from sd3plugin.errors import ConfigError

    def proc(stdout="", stderr="", code=1):
        return SimpleNamespace(stdout=stdout, stderr=stderr, returncode=code)

    err = child_failure(proc(ERROR_MARK + json.dumps({"config_error": True, "message": "model='x' is bad"}), code=2))
    assert type(err) is ConfigError and str(err) == "model='x' is bad"
    err = child_failure(proc(ERROR_MARK + json.dumps({"config_error": False, "message": "RuntimeError: boom"})))
    assert isinstance(err, CacheError) and "RuntimeError: boom" in str(err) and "\n" not in str(err)
    err = child_failure(proc(stderr="import time: 1 | 2 | torch\nSegmentation fault\nimport time: 3 | 4 | x\n",
                             code=-11))
    assert str(err).startswith("the verify process failed (exit -11): Segmentation fault")
