"""Start-up imports: ``import sd3plugin``, the CLI start and the API path import only what the run uses.

Each check runs in a fresh interpreter. ``python -X importtime`` lists every module a statement imported;
for the optimize path a recorder around ``__import__`` / ``importlib.import_module`` names the sd3plugin
module that asked for a heavy package (diffusers and transformers import torchao themselves when it is
installed: that is theirs, not ours).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# Never at `import sd3plugin`: the API functions load at their first use.
HEAVY = ("torch", "diffusers", "transformers", "hydra", "omegaconf", "torchao", "matplotlib", "flash_attn",
         "triton")


def importtime(code: str, *args: str) -> tuple[dict[str, float], str]:
    """{module: cumulative seconds} of everything ``code`` imported in a fresh interpreter, and its stdout."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *(["-c", code] if code else []), *args],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|", 2)
            if cumulative.strip().isdigit():
                modules[name.strip()] = int(cumulative) / 1e6
    return modules, proc.stdout


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env


def _imported(modules: dict, packages) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_import_sd3plugin_imports_nothing_heavy():
    modules, _ = importtime("import sd3plugin")
    assert "sd3plugin" in modules
    assert _imported(modules, HEAVY) == []
    assert modules["sd3plugin"] < 0.5, modules["sd3plugin"]  # milliseconds, not torch's seconds


def test_the_api_is_still_there_at_first_use():
    modules, out = importtime("import sd3plugin, sys; print(callable(sd3plugin.optimize), "
                              "sd3plugin.report.__module__, 'optimize' in dir(sd3plugin))")
    assert out.split() == ["True", "sd3plugin.optimize", "True"]
    assert "torch" in modules  # now it is loaded: the first use pays for it
    # importing the submodule sd3plugin.optimize first must not hide the function of the same name
    _, out = importtime("import sd3plugin.pipeline, sd3plugin.optimize, sd3plugin; print(type(sd3plugin.optimize).__name__)")
    assert out.split() == ["function"]
    with pytest.raises(AttributeError):
        __import__("sd3plugin").no_such_function


def test_cli_start_parses_arguments_before_any_heavy_import():
    modules, out = importtime("", "-m", "sd3plugin.cli.cache", "--help")
    assert "warm" in out and "verify" in out
    assert _imported(modules, HEAVY) == []


RECORDER = textwrap.dedent('''
    import builtins, importlib, importlib.util, json, sys
    WATCH = tuple(json.loads(sys.argv[2]))
    seen = []

    def _note(caller, name):
        if caller.startswith("sd3plugin") and any(name == w or name.startswith(w + ".") for w in WATCH):
            seen.append([caller, name])

    _import = builtins.__import__
    def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__", "") or ""
        full = name
        if level:
            full = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__") or caller)
        _note(caller, full)
        for item in fromlist or ():
            _note(caller, f"{full}.{item}")
        return _import(name, globals, locals, fromlist, level)
    builtins.__import__ = recording_import

    _import_module = importlib.import_module
    def recording_import_module(name, package=None):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        _note(caller, importlib.util.resolve_name(name, package) if name.startswith(".") else name)
        return _import_module(name, package)
    importlib.import_module = recording_import_module
''')


@pytest.mark.slow  # a fresh interpreter that imports the stack: in the slow lane of .ci/run
def test_optimize_with_backend_eager_imports_no_compiler_quantizer_hydra_or_plotting(tmp_path):
    """A complete config (what report(pipe)["config"] holds) needs no Hydra; eager needs no inductor,
    torchao (quant=none), FlashAttention or matplotlib."""
    from omegaconf import OmegaConf

    from sd3plugin.config import compose

    cfg = OmegaConf.to_container(compose(None, ["backend=eager", f"cache_dir={tmp_path}"]), resolve=True,
                                 enum_to_str=True)
    script = RECORDER + textwrap.dedent('''
        from diffusers import SD3Transformer2DModel
        from sd3plugin.models import ARCHITECTURES
        import sd3plugin
        t = SD3Transformer2DModel(**ARCHITECTURES["tiny"].transformer)
        sd3plugin.optimize(t, json.loads(sys.argv[1]))
        rep = sd3plugin.report(t)
        print(json.dumps({"seen": seen, "backend": rep["backend"], "status": rep["status"],
                          "quant": rep["quant"]["type"]}))
    ''')
    watch = ["torchao", "matplotlib", "flash_attn", "hydra", "torch._inductor"]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg), json.dumps(watch)], capture_output=True,
                          text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "eager" and result["status"] == "eager" and result["quant"] == "none"
    assert result["seen"] == []


def test_the_recorder_sees_an_import_made_by_sd3plugin():
    """The check above can fail: the same recorder catches sd3plugin asking for Hydra (a preset name
    needs composition)."""
    script = RECORDER + textwrap.dedent('''
        from sd3plugin.config import compose
        compose(None, ["mode=max-speed"])
        print(json.dumps(seen))
    ''')
    proc = subprocess.run([sys.executable, "-c", script, "{}", json.dumps(["hydra"])], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(caller.startswith("sd3plugin.") and name.startswith("hydra") for caller, name in seen)
