"""`sd3plugin-cache doctor`: what it reports, and `--fix` on a fake nexfort install with the
0.1.dev330 wheel's layout (extension modules at the top of site-packages, onediff#1189)."""
import json
import os
import subprocess
import sys

import pytest

from sd3plugin import environment
from sd3plugin.cli.cache import main as cache_main

MODULES = ["triton.cpython-311-x86_64-linux-gnu.so", "triton_helpers.cpython-311-x86_64-linux-gnu.so",
           "nexfort_codegen_extension.cpython-311-x86_64-linux-gnu.so"]


@pytest.fixture
def fake_nexfort(tmp_path, monkeypatch):
    """A site-packages folder holding nexfort 0.1.dev330 as its wheel installs it (content faked)."""
    site = tmp_path / "site-packages"
    info = site / "nexfort-0.1.dev330.dist-info"
    (site / "nexfort" / "inductor").mkdir(parents=True)
    (site / "nexfort" / "__init__.py").write_text("")
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nexfort\nVersion: 0.1.dev330\n")
    record = ["nexfort/__init__.py,,"]
    for name in MODULES:
        (site / name).write_bytes(b"\x7fELF fake " + name.encode())
        record.append(f"{name},sha256=x,{len(name)}")
    record.append("nexfort-0.1.dev330.dist-info/RECORD,,")
    (info / "RECORD").write_text("\n".join(record) + "\n")
    dist = environment.nexfort_distribution([str(site)])
    monkeypatch.setattr(environment, "nexfort_distribution", lambda paths=None: dist)
    return site


def test_detects_and_fixes_misplaced_modules_idempotently(fake_nexfort):
    site = fake_nexfort
    codegen = site / "nexfort" / "inductor" / "codegen"
    found = environment.misplaced_nexfort_modules()
    assert sorted(m.source.name for m in found) == sorted(MODULES)
    assert all(m.source.parent == site and m.target.parent == codegen for m in found)

    actions = environment.fix_nexfort_layout()
    assert (codegen / "__init__.py").is_file()
    for name in MODULES:  # nexfort imports them from both places (nexfort/kernels: top level)
        assert (site / name).read_bytes() == (codegen / name).read_bytes() == b"\x7fELF fake " + name.encode()
        assert f"copied {site / name} -> {codegen / name}" in actions
    assert not list(site.rglob("*.sd3plugin-tmp"))
    assert environment.misplaced_nexfort_modules() == []
    assert environment.fix_nexfort_layout() == []  # idempotent
    # RECORD lists the copies, so `pip uninstall nexfort` removes them
    record = (site / "nexfort-0.1.dev330.dist-info" / "RECORD").read_text()
    assert f"nexfort/inductor/codegen/{MODULES[0]},sha256=x,{len(MODULES[0])}" in record
    assert f"\n{MODULES[0]},sha256=x," in record
    assert record.count("nexfort/inductor/codegen/__init__.py,,") == 1

    # a top-level copy moved away (by hand, or by an older fix) is put back
    (site / MODULES[2]).unlink()
    assert [(m.source, m.target) for m in environment.misplaced_nexfort_modules()] == \
        [(codegen / MODULES[2], site / MODULES[2])]
    assert environment.fix_nexfort_layout() == [f"copied {codegen / MODULES[2]} -> {site / MODULES[2]}"]
    assert environment.misplaced_nexfort_modules() == []


def test_fix_refuses_clearly_and_changes_nothing_when_not_writable(fake_nexfort, monkeypatch):
    monkeypatch.setattr(environment, "_writable", lambda path: False)
    with pytest.raises(environment.LayoutFixError, match="not writable by this user") as err:
        environment.fix_nexfort_layout()
    assert str(fake_nexfort) in str(err.value) and "nexfort/inductor/codegen" in str(err.value)
    assert sorted(p.name for p in fake_nexfort.iterdir()) == sorted([*MODULES, "nexfort",
                                                                    "nexfort-0.1.dev330.dist-info"])
    assert not (fake_nexfort / "nexfort" / "inductor" / "codegen").exists()


def test_doctor_cli_fix_json_and_refusal(fake_nexfort, monkeypatch, capsys, tmp_path):
    assert cache_main(["doctor", "--json", f"cache_dir={tmp_path / 'c'}"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["nexfort_layout"]["misplaced"]) == 3 and rep["fixed"] == []

    writable = environment._writable
    monkeypatch.setattr(environment, "_writable", lambda path: False)
    assert cache_main(["doctor", "--fix", f"cache_dir={tmp_path / 'c'}"]) == 8  # EXIT["cannot_write"]
    err = capsys.readouterr().err
    assert "doctor --fix: cannot repair nexfort's layout" in err and str(fake_nexfort) in err
    monkeypatch.setattr(environment, "_writable", writable)

    assert cache_main(["doctor", "--fix", f"cache_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    assert out.count("fix: copied ") == 3 and "nexfort layout: ok" in out
    assert cache_main(["doctor", "--fix", "--json", f"cache_dir={tmp_path / 'c'}"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fixed"] == ["nothing to fix: nexfort's layout is fine"]
    assert rep["nexfort_layout"]["misplaced"] == []


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_doctor_reports_versions_gpu_backends_and_cache(tmp_path):
    cache = tmp_path / "cache"
    (cache / "inductor").mkdir(parents=True)
    (cache / "inductor" / "blob").write_bytes(b"x" * 5000)
    env = {k: v for k, v in os.environ.items() if k != "SD3PLUGIN_KEEP_COORDESC"}
    proc = subprocess.run([sys.executable, "-m", "sd3plugin.cli.cache", "doctor", "--json", f"cache_dir={cache}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    import torch

    v = rep["versions"]
    assert v["torch"] == torch.__version__ and v["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("triton", "cuda", "cudnn", "diffusers", "onediff", "nexfort"):
        assert key in v
    assert rep["gpu"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert rep["gpu"]["fp8"] is False and rep["gpu"]["capability"] is None
    assert set(rep["backends"]) >= {"eager", "inductor", "nexfort", "auto"}
    assert rep["backends"]["nexfort"]["usable"] == environment.nexfort_status()[0]
    assert rep["backends"]["nexfort"]["reason"] == environment.nexfort_status()[1]
    assert rep["backends"]["auto"]["chooses"] in ("nexfort", "inductor")
    from sd3plugin.compat import inductor as coordesc

    on = "on" if coordesc._has_recheck() else "n/a"  # torch 2.4 (the nexfort stack) has nothing to fix
    precompile = rep["cache"].pop("precompile")
    assert isinstance(precompile["supported"], bool) and precompile["reason"]
    assert rep["cache"] == {"dir": str(cache), "exists": True, "size_bytes": 5000, "keep_coordesc": on}
    if not torch.cuda.is_available():
        assert rep["attention"] == {"auto_chooses": "sdpa", "reason": "auto: sdpa (FA4 needs a CUDA GPU (this run is on CPU))"}

    text = subprocess.run([sys.executable, "-m", "sd3plugin.cli.cache", "doctor", f"cache_dir={cache}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert text.returncode == 0, text.stderr
    for needle in (f"torch               {torch.__version__}", "nexfort", "backends:", "auto      -> ",
                   f"attention: auto -> {rep['attention']['auto_chooses']}",
                   f"cache dir: {cache} (4.9 KiB)", "coordinate-descent configs reused at warm starts: "):
        assert needle in text.stdout
    off = subprocess.run([sys.executable, "-m", "sd3plugin.cli.cache", "doctor", f"cache_dir={cache}"],
                         capture_output=True, text=True, timeout=300, env={**env, "SD3PLUGIN_KEEP_COORDESC": "0"})
    expected = "no (SD3PLUGIN_KEEP_COORDESC=0)" if on == "on" else "torch's own caching"
    assert f"coordinate-descent configs reused at warm starts: {expected}" in off.stdout, off.stderr
    assert ("warm starts: yes" in text.stdout) == (on == "on")


@pytest.mark.parametrize("capability, fp8", [((8, 0), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_capability_threshold(monkeypatch, capability, fp8):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = environment.gpu_info()
    assert info["fp8"] is fp8 and info["capability"] == f"{capability[0]}.{capability[1]}"
