"""backend=auto outside the nexfort environment: inductor, with the reason nexfort was not chosen, once
in the log and in report(pipe); backend=nexfort explains in one line why it cannot run."""
import logging

import pytest
from diffusers import StableDiffusion3Pipeline

import sd3plugin
from sd3plugin import environment
from sd3plugin.backends import resolve_backend
from sd3plugin.config import compose
from sd3plugin.errors import BackendUnavailableError
from sd3plugin.plan import make_plan

pytestmark = pytest.mark.skipif(environment.nexfort_status()[0],
                                reason="nexfort is usable here (tests/nexfort covers this environment)")


def _plan(*overrides):
    return make_plan(compose(None, ["device=cpu", *overrides]))


def test_auto_picks_inductor_and_says_why_nexfort_is_not_usable():
    backend, reason = resolve_backend("auto", _plan())
    ok, why_not = environment.nexfort_status()
    assert backend.name == "inductor"
    assert not ok and why_not in reason
    assert "\n" not in reason  # one line


def test_report_and_log_carry_the_choice_once(tiny_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="sd3plugin")
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=[f"cache_dir={cache_dir}", "backend=auto"])
    rep = sd3plugin.report(pipe)
    assert rep["backend"] == "inductor"
    assert rep["backend_reason"].startswith("auto: inductor, because nexfort is not usable here: ")
    choices = [r.getMessage() for r in caplog.records if "backend inductor" in r.getMessage()]
    assert len(choices) == 1 and "nexfort" in choices[0]
    sd3plugin.undo(pipe)


@pytest.mark.parametrize("versions, expected", [
    ({"nexfort": None}, "nexfort is not installed"),
    ({"nexfort": "0.1.dev330", "triton": "3.0.0"}, "needs torch 2.4.0 exactly"),
])
def test_reasons_name_the_problem_and_the_fix(monkeypatch, versions, expected):
    import torch

    real = environment.dist_version
    monkeypatch.delenv(environment.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(environment, "dist_version", lambda name: versions.get(name, real(name)))
    ok, reason = environment.nexfort_static_check()
    assert not ok and expected in reason and "scripts/nexfort-env.sh" in reason


def test_wrong_triton_is_named(monkeypatch):
    import torch

    real = environment.dist_version
    monkeypatch.delenv(environment.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch, "__version__", "2.4.0+cu121")
    monkeypatch.setattr(environment, "dist_version",
                        lambda name: {"nexfort": "0.1.dev330", "triton": "3.1.0"}.get(name, real(name)))
    ok, reason = environment.nexfort_static_check()
    assert not ok and "needs triton 3.0.0, this has triton 3.1.0" in reason


def test_disable_switch_makes_auto_skip_nexfort(monkeypatch):
    monkeypatch.setenv(environment.DISABLE_ENV, "1")
    assert environment.nexfort_static_check() == (False, "nexfort is switched off by SD3PLUGIN_DISABLE_NEXFORT=1")


def test_requested_nexfort_raises_or_falls_back_with_the_reason(tiny_path, cache_dir):
    why_not = environment.nexfort_status()[1]
    with pytest.raises(BackendUnavailableError, match="backend='nexfort' cannot run here: ") as err:
        sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                           overrides=[f"cache_dir={cache_dir}", "backend=nexfort", "on_error=raise"])
    assert why_not in str(err.value)
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=[f"cache_dir={cache_dir}", "backend=nexfort"])
    rep = sd3plugin.report(pipe)
    assert rep["backend"] == "eager" and why_not in rep["error"]
