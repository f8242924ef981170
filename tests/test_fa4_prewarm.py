"""The FA4 prewarm child (sd3plugin/kernels/fa4_prewarm.py): shapes it compiles for, when it is skipped, and how the
first FA4 call waits for it. The FA4 kernel itself needs a Hopper GPU (gpu-marked test at the end)."""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
import torch

from sd3plugin.kernels import attention, fa4, fa4_prewarm
from sd3plugin.models import ARCHITECTURES


def _config(name):
    return SimpleNamespace(**ARCHITECTURES[name].transformer)


def test_shapes_of_sd3_medium_at_its_default_resolution():
    # 1024x1024 -> 64x64 latent patches = 4096 image tokens, + 77 CLIP + 256 T5 tokens; CFG doubles the batch
    assert fa4_prewarm.attention_shapes(_config("sd3-medium"), None, None, 1, True) == [(2, 4429, 24, 64)]
    assert fa4_prewarm.attention_shapes(_config("sd3-medium"), 768, 1344, 2, False) == [(2, 48 * 84 + 333, 24, 64)]


def test_sd35_adds_the_image_only_attention_of_its_dual_attention_blocks():
    assert fa4_prewarm.attention_shapes(_config("sd3.5-medium"), 1024, 1024, 1, True) == [
        (2, 4429, 24, 64), (2, 4096, 24, 64)]


def test_skipped_when_the_fa4_cache_holds_kernels(tmp_path):
    (tmp_path / "fingerprint" / "fwd").mkdir(parents=True)
    (tmp_path / "fingerprint" / "fwd" / "abc.o").write_bytes(b"kernel")
    status = fa4_prewarm.start(str(tmp_path), [(2, 4429, 24, 64)], torch.float16, 0)
    assert status["state"].startswith("skipped")
    assert fa4_prewarm._PENDING == []


def test_turned_off_by_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SD3PLUGIN_FA4_PREWARM", "0")
    status = fa4_prewarm.start(str(tmp_path), [(2, 4429, 24, 64)], torch.float16, 0)
    assert status["state"].startswith("off") and fa4_prewarm._PENDING == []


def _tiny_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**ARCHITECTURES["tiny"].transformer).eval()


def test_optimize_starts_the_prewarm_for_the_configured_run(tmp_path, monkeypatch):
    """Where attention resolves to fa4, optimize() hands the run's attention shape to the prewarm and puts its
    status in the report (CPU: the kernel choice and the child are stand-ins)."""
    import sd3plugin

    fa4_dir = str(tmp_path / "inductor" / "fa4")
    started = []
    monkeypatch.setattr(attention, "resolve_kernel", lambda name, device, dtype: ("fa4", "test: fa4"))
    monkeypatch.setattr(fa4, "fa4_cache_dir", lambda: fa4_dir)
    monkeypatch.setattr(fa4_prewarm, "start", lambda d, shapes, dtype, index: started.append((d, shapes))
                        or {"state": "running (stand-in)"})
    t = _tiny_transformer()
    sd3plugin.optimize(t, overrides=[f"cache_dir={tmp_path}", "device=cpu", "backend=inductor", "height=256",
                                     "width=128", "num_images=3"])
    try:
        # tiny: patch 2 x VAE 8 = 16 px a token: 16 x 8 image tokens + 333 text tokens; CFG doubles 3 images
        assert started == [(fa4_dir, [(6, 16 * 8 + 333, 4, 8)])]
        assert sd3plugin.report(t)["attention"]["prewarm"] == {"state": "running (stand-in)"}
    finally:
        sd3plugin.undo(t)
        sd3plugin.disable()


def test_no_prewarm_when_fa4_keeps_its_kernels_elsewhere(tmp_path, monkeypatch):
    """flash-attn-4 imported before sd3plugin set its cache dir: a child's kernel would not be found."""
    import sd3plugin

    monkeypatch.setattr(attention, "resolve_kernel", lambda name, device, dtype: ("fa4", "test: fa4"))
    monkeypatch.setattr(fa4, "fa4_cache_dir", lambda: "/somewhere/else")
    monkeypatch.setattr(fa4_prewarm, "start", lambda *a: pytest.fail("no child expected"))
    t = _tiny_transformer()
    sd3plugin.optimize(t, overrides=[f"cache_dir={tmp_path}", "device=cpu", "backend=inductor"])
    try:
        state = sd3plugin.report(t)["attention"]["prewarm"]["state"]
        assert state.startswith("skipped") and "/somewhere/else" in state
    finally:
        sd3plugin.undo(t)
        sd3plugin.disable()


def _job(code: str) -> fa4_prewarm.Prewarm:
    status: dict = {}
    return fa4_prewarm.Prewarm([sys.executable, "-c", code], status)


def test_first_call_waits_for_the_child_and_records_it(monkeypatch, tmp_path):
    done = tmp_path / "done"
    # the child's last act is writing `done`: if wait_pending() returned early, the file would be missing
    job = _job(f"import pathlib, time; time.sleep(0.3); pathlib.Path({str(done)!r}).write_text('1')")
    monkeypatch.setattr(fa4_prewarm, "_PENDING", [job])
    assert job.status["state"] == "running"
    fa4_prewarm.wait_pending()
    assert done.read_text() == "1"  # it really waited for the child
    assert fa4_prewarm._PENDING == []
    assert job.status["state"] == "done" and job.status["seconds"] > 0
    fa4_prewarm.wait_pending()  # nothing left: returns at once


def test_a_failing_child_is_reported_and_the_parent_goes_on(caplog):
    job = _job("import sys; sys.stderr.write('no GPU here\\n'); sys.exit(3)")
    assert job.wait() is False
    assert job.status["state"] == "failed"
    assert "exit code 3" in job.status["error"] and "no GPU here" in job.status["error"]
    assert "compiled at its first call instead" in caplog.text


def test_a_hanging_child_is_killed_after_the_timeout():
    job = _job("import threading; threading.Event().wait()")  # a child that never ends
    t0 = time.perf_counter()
    assert job.wait(timeout=0.5) is False
    assert time.perf_counter() - t0 < 10
    assert job.proc.returncode is not None
    assert job.status["error"].startswith("timed out after")


CHILD_CHECK = """
import json, os, sys, time
os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] = "1"
os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = sys.argv[1]
import torch
from sd3plugin.kernels import attention, fa4, fa4_prewarm
shape = (2, 1024 + 333, 24, 64)
status = fa4_prewarm.start(fa4.fa4_cache_dir(), [shape], torch.float16, 0)
fa4_prewarm.wait_pending()
q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.float16) for _ in range(3))
t0 = time.perf_counter()
attention.fa4_attention(q, k, v)
torch.cuda.synchronize()
print(json.dumps(dict(status, first_call=time.perf_counter() - t0)))
"""


@pytest.mark.gpu
def test_prewarmed_kernel_is_loaded_not_compiled(tmp_path):
    """A fresh FA4 cache: the child compiles the kernel into it; the parent's first call then loads it."""
    if attention.fa4_unavailable("cuda", torch.float16):
        pytest.skip(attention.fa4_unavailable("cuda", torch.float16))
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-c", CHILD_CHECK, str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["state"] == "done", result
    assert list(tmp_path.rglob("*.o")), "the child wrote no kernel into the FA4 cache"
    assert result["first_call"] < 3, result  # loaded from disk; compiling takes over 10 s on an H100
