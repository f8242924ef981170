"""Everyday misuse of sd3plugin-run, as a user meets it (subprocesses): outputs that cannot be written (a real
read-only mount), an unknown flag, two runs started in the same second in one folder, Ctrl-C (a real SIGINT
to the process group, as a terminal sends it). Each ends with one line and its documented exit code, and
nothing the user had is lost."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd3plugin.cli.exit_codes import EXIT

# A private mount namespace in which FOLDER is a read-only bind mount of itself; the command starts inside
# FOLDER when it is the working folder ("cd" after the mount: a cwd from before it would bypass it).
_RO = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && cd "$1" && shift && exec "$@"'


def _read_only_mounts() -> str | None:
    """None if read-only bind mounts work here, else why not (the tests that need one are skipped)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = Path(os.environ.get("TMPDIR", "/tmp"))
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", _RO, str(probe), str(probe),
                          "sh", "-c", "! touch .sd3plugin-ro-probe 2>/dev/null"], capture_output=True, text=True)
    if res.returncode:
        return f"no read-only bind mount here (needs root and mount namespaces): {res.stderr.strip()[:200]}"
    return None


RO_UNAVAILABLE = _read_only_mounts()
needs_ro = pytest.mark.skipif(RO_UNAVAILABLE is not None, reason=RO_UNAVAILABLE or "")


def app(args, cwd, timeout=600, **kw):
    return [sys.executable, "-m", "sd3plugin", *args], dict(cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                                           text=True, **kw)


def run_read_only(folder: Path, cwd: Path, args, timeout=300):
    cmd, kw = app(args, cwd)
    kw.pop("cwd")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", _RO, str(folder), str(cwd),
                           *cmd], capture_output=True, timeout=timeout, **kw)


def one_line_error(res, code: str, *needles):
    assert res.returncode == EXIT[code], (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "hook enabled" not in res.stdout  # refused before anything loaded
    return lines[0]


def test_unknown_flag_is_one_line_exit_2(tmp_path):
    cmd, kw = app(["--foo", "steps=1"], tmp_path)
    res = subprocess.run(cmd, capture_output=True, timeout=120, **kw)
    one_line_error(res, "usage", "unknown flag '--foo'", "sd3plugin-run --help")
    assert "usage:" not in res.stderr and not (tmp_path / "outputs").exists()


@needs_ro
@pytest.mark.parametrize("case", ["output_dir", "saved_image", "working_folder", "cache_dir"])
def test_unwritable_outputs_refused_before_loading(tmp_path, case):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "mine.png").write_bytes(b"the user's own file")
    work = tmp_path / "work"
    work.mkdir()
    cwd, fix = work, "a folder you can write"
    args = {"output_dir": [f"output_dir={ro / 'out'}"],
            "saved_image": ["--saved-image", str(ro / "mine.png")],
            "working_folder": [],
            "cache_dir": [f"cache_dir={ro}"]}[case] + ["backend=eager", "steps=1"]
    if case == "working_folder":
        cwd = ro
    line = run_read_only(ro, cwd, args)
    text = one_line_error(line, "cannot_write", str(ro), "read-only file system", fix)
    assert {"output_dir": "output_dir=PATH", "saved_image": "--saved-image", "working_folder": "output_dir=PATH",
            "cache_dir": "cache_dir=PATH"}[case] in text
    assert sorted(p.name for p in ro.iterdir()) == ["mine.png"]
    assert (ro / "mine.png").read_bytes() == b"the user's own file"
    assert not (work / "outputs").exists()


def _preclaim(cwd: Path, seconds: int = 120) -> list[Path]:
    """Folders of earlier runs for every second of the next two minutes, each with its report."""
    now = datetime.datetime.now()
    taken = []
    for s in range(-1, seconds):
        t = now + datetime.timedelta(seconds=s)
        folder = cwd / "outputs" / t.strftime("%Y-%m-%d") / t.strftime("%H-%M-%S")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text('{"earlier": true}')
        taken.append(folder)
    return taken


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_folders(tmp_path, cache_dir):
    """Two runs started at once in one folder, whose DATE/TIME folder is taken by an earlier run: each run
    writes a folder of its own (TIME_2, TIME_3...), consistent with itself; the earlier run's is untouched.
    The libraries' known harmless warnings are in each run's run.log, not on the terminal."""
    taken = _preclaim(tmp_path)
    procs = []
    for seed in (1, 2):
        cmd, kw = app(["backend=eager", "steps=1", f"seed={seed}"], tmp_path)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert all(json.loads((f / "report.json").read_text()) == {"earlier": True} for f in taken)
    reports = sorted((tmp_path / "outputs").glob("*/*/report.json"))
    ours = [r for r in reports if "earlier" not in json.loads(r.read_text())]
    assert len(ours) == 2 and len({r.parent for r in ours}) == 2
    for report in ours:
        folder = report.parent
        assert "_" in folder.name  # the earlier run had the plain DATE/TIME name
        seed = json.loads(report.read_text())["config"]["seed"]
        assert f"seed={seed}" in (folder / ".hydra" / "overrides.yaml").read_text()
        assert (folder / "image_00.png").is_file() and json.loads(report.read_text())["complete"] is True
    assert sorted(json.loads(r.read_text())["config"]["seed"] for r in ours) == [1, 2]
    for out, err in outs:
        terminal = out + err
        assert "requires torchvision (not installed)" not in terminal and "Failed to load" not in terminal
        assert "Unable to import `torchao`" not in terminal and "Traceback" not in terminal
    logs = "".join((r.parent / "run.log").read_text() for r in ours)
    assert "Unable to import `torchao` Tensor objects" in logs or "Failed to load" in logs


@pytest.mark.slow
def test_multirun_with_output_dir_gives_each_job_a_folder(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    cmd, kw = app(["-m", "backend=eager", "steps=1,2", f"output_dir={out}"], tmp_path)
    res = subprocess.run(cmd, capture_output=True, timeout=600, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = {p.parent.name: json.loads(p.read_text())["steps"] for p in out.glob("*/report.json")}
    assert steps == {"0": 1, "1": 2}
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def as_in_a_terminal() -> None:
    """In the child before exec: Ctrl-C's default action, as a terminal's foreground job has it. A test run
    started in the background (``cmd &``, nohup, some CI runners) would otherwise pass SIGINT on as ignored,
    and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(line_part: str, args, cwd, env=None):
    """Start sd3plugin-run, send SIGINT to its process group (what Ctrl-C in a terminal does) when a line
    containing ``line_part`` appears on stdout; return (exit code, stderr)."""
    cmd, kw = app(args, cwd)
    if env:
        kw["env"].update(env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=as_in_a_terminal, **kw)
    try:
        for line in proc.stdout:
            if line_part in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def check_interrupted(code, err, out: Path):
    assert code == EXIT["interrupted"] == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err
    last = err.strip().splitlines()[-1]
    report = out / "report.json"
    assert last == f"sd3plugin-run: interrupted (Ctrl-C); the run is marked incomplete in {report.resolve()}"
    data = json.loads(report.read_text())
    assert data["complete"] is False and "Ctrl-C" in data["reason"]
    assert not list(out.glob("*.png")) and not list(out.glob(".*.part"))
    return data


def test_ctrl_c_is_one_line_exit_130_and_the_folder_says_incomplete(tmp_path, cache_dir):
    """Ctrl-C once the pipeline is loaded: one line, exit code 130, report.json marks the run incomplete,
    no image and no traceback."""
    out = tmp_path / "out"
    code, err = interrupt_when("sd3plugin: backend eager", ["backend=eager", "steps=100000", f"output_dir={out}"],
                               tmp_path)
    assert check_interrupted(code, err, out)["config"]["steps"] == 100000


@pytest.mark.slow
def test_ctrl_c_while_compiling(tmp_path):
    """Ctrl-C at the first (compiling) call, into an empty compile cache: it stops the run (no fallback to
    eager, no dropped interrupt), with one line and exit code 130."""
    out = tmp_path / "out"
    code, err = interrupt_when("Dynamo traces the blocks", ["steps=3", f"output_dir={out}"], tmp_path,
                               env={"SD3PLUGIN_CACHE_DIR": str(tmp_path / "cache")})
    check_interrupted(code, err, out)


def test_a_taken_folder_is_never_reused(tmp_path):
    from sd3plugin.apps.run_folder import claim

    base = tmp_path / "outputs" / "2026-01-01" / "12-00-00"
    assert [claim(base) for _ in range(3)] == [base, base.with_name("12-00-00_2"), base.with_name("12-00-00_3")]


def test_interrupted_before_writing_removes_only_its_own_empty_folder(tmp_path, monkeypatch):
    from sd3plugin.apps import run_folder

    monkeypatch.setattr(run_folder, "CLAIMED", [])
    empty = run_folder.claim(tmp_path / "a")
    (empty / ".hydra").mkdir()
    (empty / "run.log").write_text("log")
    used = run_folder.claim(tmp_path / "b")
    (used / "bench.json").write_text("{}")
    assert run_folder.release_unused() == ([empty.resolve()], [used.resolve()])
    assert not empty.exists() and (used / "bench.json").is_file()


def test_a_file_where_the_run_folder_goes_is_one_line_exit_8(tmp_path):
    (tmp_path / "outputs").write_text("not a folder")
    cmd, kw = app(["backend=eager", "steps=1"], tmp_path)
    res = subprocess.run(cmd, capture_output=True, timeout=120, **kw)
    one_line_error(res, "cannot_write", f"{tmp_path / 'outputs'} is a file, not a folder", "output_dir=PATH")
    assert (tmp_path / "outputs").read_text() == "not a folder"


def test_known_harmless_warnings_go_to_the_log_file_only(tmp_path, capsys):
    """A library logger with a terminal handler of its own (as transformers has): the known harmless warning
    reaches the root's log file once and not the terminal; any other warning still reaches the terminal."""
    import logging

    from sd3plugin.apps.quiet_logs import route_known_warnings

    root, lib = logging.getLogger(), logging.getLogger("transformers")
    log_file = logging.FileHandler(tmp_path / "run.log")
    own, saved = logging.StreamHandler(sys.stderr), lib.propagate
    lib.addHandler(own)
    lib.propagate = False
    root.addHandler(log_file)
    try:
        route_known_warnings()
        noise = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        logging.getLogger("transformers.utils.import_utils").warning(noise)
        logging.getLogger("transformers.modeling_utils").warning("a warning that matters")
    finally:
        lib.removeHandler(own)
        lib.propagate = saved
        root.removeHandler(log_file)
        log_file.close()
    err = capsys.readouterr().err
    assert "requires torchvision" not in err and "a warning that matters" in err
    assert (tmp_path / "run.log").read_text().count("requires torchvision") == 1


def test_a_dropped_ctrl_c_is_delivered_again(monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a weakref callback is dropped by Python ("Exception ignored"); the
    hook keeps it, silently, and the run's next check (after a denoising step) raises it."""
    import gc
    import weakref

    from sd3plugin.apps import interrupt

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(interrupt, "_DROPPED", [])
    interrupt.deliver_dropped_interrupts()

    class Thing:
        pass

    def callback(_):
        raise KeyboardInterrupt

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    gc.collect()
    assert ref() is None and "Exception ignored" not in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        interrupt.step_check(None, 0, 0, {})
    assert interrupt.step_check(None, 1, 0, {"latents": 1}) == {"latents": 1}  # raised once


@pytest.mark.parametrize("args, code, needle", [
    (["-m", "steps=1,2", "--saved-image", "x.png"], "usage", "image_path (--saved-image) names one file"),
])
def test_multirun_with_one_image_file_is_refused(tmp_path, args, code, needle):
    cmd, kw = app(args, tmp_path)
    res = subprocess.run(cmd, capture_output=True, timeout=120, **kw)
    one_line_error(res, code, needle)
    assert not (tmp_path / "multirun").exists()


def test_printing_the_config_creates_no_folder(tmp_path):
    cmd, kw = app(["--cfg", "job", "steps=1"], tmp_path)
    res = subprocess.run(cmd, capture_output=True, timeout=120, **kw)
    assert res.returncode == 0 and "steps: 1" in res.stdout, res.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_ctrl_c_in_the_benchmark(tmp_path, cache_dir):
    """sd3plugin-bench interrupted while it measures: one line, exit code 130, bench.json says incomplete."""
    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "sd3plugin.apps.bench", "steps=100000", "bench.repeat=1",
                             "bench.cache_warmup=false", f"output_dir={out}"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=as_in_a_terminal, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "sd3plugin-bench: measuring eager" in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        lines += proc.communicate(timeout=300)[0].splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    bench_json = (out / "bench.json").resolve()
    assert lines[-1].strip() == f"sd3plugin-bench: interrupted (Ctrl-C); the run is marked incomplete in {bench_json}"
    data = json.loads(bench_json.read_text())
    assert data["complete"] is False and "Ctrl-C" in data["reason"]


def test_a_ctrl_c_that_a_library_swallows_is_raised_again_at_the_next_step(monkeypatch):
    from sd3plugin.apps import interrupt

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    monkeypatch.setattr(interrupt, "_DROPPED", [])
    old = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt.deliver_dropped_interrupts()
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C ...
        except KeyboardInterrupt:
            pass  # ... caught by a library that goes on
        with pytest.raises(KeyboardInterrupt):
            interrupt.step_check(None, 0, 0, {})  # the next step stops the run
        assert interrupt.step_check(None, 1, 0, {"k": 1}) == {"k": 1}  # once
    finally:
        signal.signal(signal.SIGINT, old)
