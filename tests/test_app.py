"""sd3plugin-run end to end (subprocesses): outputs, report, exit codes, --cfg job, multirun, seed flags."""
import json
import os
import subprocess
import sys

import pytest


def run_app(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "sd3plugin", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_default_run_compiles_and_writes_outputs(tmp_path, cache_dir):
    out = tmp_path / "out"
    res = run_app(["steps=4", f"output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["optimization"]["backend"] == "inductor"
    assert report["optimization"]["status"] == "compiled"
    assert "nexfort" in report["optimization"]["backend_reason"]  # auto says why
    assert report["warmup_seconds"] > 0 and report["iterations_per_second"] > 0 and report["e2e_seconds"] > 0
    assert report["config"]["cache_dir"] == str(cache_dir)
    # compiled after the hook's `with` block ended: the plan's cache dir still held during the calls
    assert any((cache_dir / "inductor").rglob("*.py")), "compiled code did not land in cache_dir"
    from PIL import Image

    img = Image.open(out / "image_00.png")
    assert img.size == (64, 64)
    md = (out / "report.md").read_text()
    assert "iteration speed" in md and "warm-up incl. compile" in md
    assert "it/s" in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["mode=bogus"], "unknown mode option 'bogus'"),
    (["height=66"], "height=66 is not a multiple of 4"),
    (["nope=1"], "unknown config key 'nope'"),
    (["--compiler-config", '{"mode": "max-optimize:warp-speed"}'], "unknown mode token 'warp-speed'"),
    (["--compiler-config", "not json"], "--compiler-config must be a JSON object"),
])
def test_config_errors_exit_2_before_loading(tmp_path, args, needle):
    res = run_app(args, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was run


def test_cfg_job_prints_composed_config(tmp_path):
    res = run_app(["--cfg", "job", "mode=seed", "dynamic=true"], cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "cudagraphs" in res.stdout and "enabled: true" in res.stdout


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_seed_command_line_and_multirun(tmp_path, cache_dir):
    res = run_app(["-m", "backend=eager", "steps=1,2", "hydra.sweep.dir=" + str(tmp_path / "sweep"),
                   "--compiler-config", '{"mode": "max-optimize:max-autotune:low-precision", '
                   '"memory_format": "channels_last", "dynamic": true}', "--height", "32", "--width", "48"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = sorted((tmp_path / "sweep").glob("*/report.json"))
    assert len(reports) == 2
    steps = sorted(json.loads(p.read_text())["steps"] for p in reports)
    assert steps == [1, 2]
    rep = json.loads(reports[0].read_text())
    assert rep["optimization"]["mode"]["spec"] == "max-optimize:max-autotune:low-precision"
    assert rep["optimization"]["dynamic"] is True and (rep["width"], rep["height"]) == (48, 32)
