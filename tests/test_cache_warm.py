"""End to end on the tiny model (CPU): two concurrent warms, pack, clear, install, verify.

One cold compile for the whole module (the first warm); everything else reuses it. The verify step
runs in a fresh process and must compile nothing and make its first image faster than the cold run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from sd3plugin.transforms.settings import activate
from sd3plugin.cli.cache import main
from sd3plugin.compat import precompile

pytestmark = pytest.mark.slow
RUN = ["steps=2"]
# torch >= 2.7 bundles every cache in a Mega-Cache blob and has an AOTAutograd cache; torch 2.4 (the
# nexfort stack) ships the inductor folder alone.
MEGACACHE = hasattr(torch.compiler, "save_cache_artifacts")
needs_megacache = pytest.mark.skipif(not MEGACACHE, reason="torch without Mega-Cache (< 2.7)")
PRECOMPILE = precompile.support()[0]  # torch >= 2.10: warm also precompiles the transformer blocks
needs_precompile = pytest.mark.skipif(not PRECOMPILE, reason=f"no precompile here: {precompile.support()[1]}")


def _env():
    env = dict(os.environ)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)
    return env


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out.strip() else None), out + err


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """Two `warm` processes started together into one cache dir; (root, [result of each])."""
    root = tmp_path_factory.mktemp("warm") / "cache"
    cmd = [sys.executable, "-m", "sd3plugin.cli.cache", "warm", "--cache-dir", str(root), "--resolutions",
           "64x64", "--json", *RUN]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outs]
    return root, sorted(results, key=lambda r: r["lock_wait_seconds"])


@pytest.fixture(scope="module")
def shipped(warmed, tmp_path_factory):
    """pack -> clear -> install into an empty dir elsewhere; (target, pack result, install result,
    seconds of the cold first call, the random-weight model folder the warm built)."""
    root, results = warmed
    archive = tmp_path_factory.mktemp("ship") / "tiny.tar.zst"

    def cli(*argv):  # module scope has no capsys
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*argv, "--json"])
        return code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()

    code, packed, err = cli("pack", "--cache-dir", str(root), "-o", str(archive))
    assert code == 0, err
    code, cleared, err = cli("clear", "--cache-dir", str(root), "--yes")
    assert code == 0 and set(cleared["removed"]) >= {"entries", "inductor"}, err
    assert not (root / "inductor").exists() and not (root / "entries").exists()
    # Install at another path, as on another machine: the cache must not depend on where it was warmed.
    target = tmp_path_factory.mktemp("serve") / "cache"
    code, installed, err = cli("install", str(archive), "--cache-dir", str(target), "--expect-sha256",
                               packed["archive_sha256"])
    assert code == 0, err
    return target, packed, installed, results[0]["shapes"][0]["seconds"], root / "models" / "tiny-float32"


def test_two_concurrent_warms_both_succeed_and_the_second_reuses_the_first(warmed, capsys):
    root, (first, second) = warmed
    assert first["ok"] and second["ok"] and first["fingerprint"] == second["fingerprint"]
    assert first["shapes"][0]["fresh_compilations"] > 0
    assert second["lock_wait_seconds"] > 0  # it waited for the first one's lock...
    assert second["shapes"][0]["fresh_compilations"] == 0  # ...then compiled nothing
    assert second["shapes"][0]["fxgraph_cache_hit"] > 0
    code, data, _ = _cli(capsys, "ls", "--cache-dir", str(root), "--json")
    (entry,) = data["entries"]
    assert entry["fingerprint"] == first["fingerprint"] and entry["compatible"]
    assert entry["shapes"] == [{"width": 64, "height": 64, "batch_size": 1, "guidance": True}]
    if MEGACACHE:
        blobs = list((root / "entries" / entry["fingerprint"]).glob("*.megacache"))
        assert len(blobs) == 1 and blobs[0].stat().st_size == second["blob_bytes"]
    if PRECOMPILE:  # SD3's blocks 0..n-2 and the last one (no context output): two artefacts per shape
        assert first["precompiled"]["built"] == 2 and first["precompiled"]["errors"] == []
        assert second["precompiled"]["built"] == 2 and second["precompiled"]["artefacts"] == 2  # replaced, not added
        index = json.loads((root / "entries" / entry["fingerprint"] / "precompiled" / "index.json").read_text())
        assert len({r["structure"] for r in index["artefacts"]}) == 2


def test_pack_manifest_describes_the_warmed_cache(shipped):
    root, packed, installed, _, _ = shipped
    m = packed["manifest"]
    if PRECOMPILE:  # carried like every file of the entry: listed with size and sha256
        from sd3plugin.cache.archive import read_manifest

        pre = {k: v for k, v in read_manifest(packed["archive"])["files"].items() if "/precompiled/" in k}
        assert len(pre) == 3 and all(len(v["sha256"]) == 64 for v in pre.values())
    assert m["fingerprint"] == installed["entries"][0]
    assert m["config"]["model"] == "tiny" and m["config"]["mode"]["spec"]
    assert m["shapes"] == [{"width": 64, "height": 64, "batch_size": 1, "guidance": True}]
    assert m["environment"]["gpu"] == "cpu" and m["environment"]["torch"]
    assert packed["files"] == installed["files"] > 2


def test_warm_start_from_the_installed_cache_compiles_nothing_and_is_faster(shipped, capsys):
    root, _, _, cold_seconds, model_folder = shipped
    assert (model_folder / "model_index.json").is_file()  # `clear` kept the random-weight model
    # Warmed with the preset, verified with the model folder: same architecture, same cache entry.
    code, data, text = _cli(capsys, "verify", "--cache-dir", str(root), "--json", f"model={model_folder}", *RUN)
    assert code == 0, text
    text = __import__("sd3plugin.cli.cmd_verify", fromlist=["x"]).summary(data, cold=False, code=0)
    assert data["fresh_compilations"] == 0 and data["fxgraph_cache_miss"] == 0
    assert data["cache"]["installed_archive"]
    if MEGACACHE:
        assert data["cache"]["megacache_loaded"]
    if PRECOMPILE:  # the precompiled blocks ran: the inductor cache was not even asked
        assert data["fxgraph_cache_hit"] == 0 and data["precompiled"]["used"]
    else:
        assert data["fxgraph_cache_hit"] > 0 and (not MEGACACHE or data["autograd_cache_hit"] > 0)
    assert data["first_image_seconds"] < cold_seconds, (data["first_image_seconds"], cold_seconds)
    startup = data["startup"]  # where the time went (docs/cache.md, start-up breakdown)
    assert "torch" in [r["module"] for r in startup["imports"]["top"]]
    assert startup["load"]["components"]["transformer"] > 0
    assert startup["first_call"]["graphs_compiled"] >= 0 and startup["first_call"]["inductor_compile_seconds"] >= 0
    assert set(startup["first_image"]) == {"text_encoding_seconds", "denoising_seconds", "vae_seconds"}
    assert "start-up: imports" in text
    if PRECOMPILE:  # the first call ran the precompiled blocks: nothing traced, nothing compiled
        assert data["precompiled"]["used"] and data["precompiled"]["hits"] > 0 and data["precompiled"]["misses"] == 0
        assert startup["first_call"]["graphs_compiled"] == 0 and startup["first_call"]["dynamo_tracing_seconds"] == 0
        assert "precompiled blocks used" in text


def test_verify_baseline_starts_plain_diffusers_and_names_every_second(shipped, capsys):
    """--baseline: plain diffusers (eager, no sd3plugin) started the same way; ratio from the two measured
    totals; every second of our start in a named phase (docs/cache.md, start-up breakdown)."""
    root, _, _, _, model_folder = shipped
    code, data, text = _cli(capsys, "verify", "--baseline", "--page-cache", "warm", "--cache-dir", str(root),
                            "--json", f"model={model_folder}", *RUN)
    assert code == 0 and data["exit_code"] == 0, text
    base = data["baseline"]
    assert base["images"] == 1 and base["steps"] == data["steps"] == 2
    assert "sd3plugin" not in [r["module"] for r in base["startup"]["imports"]["top"]]
    assert "torch" in [r["module"] for r in base["startup"]["imports"]["top"]]
    assert data["ratio"] == round(data["process_to_first_image_seconds"] / base["process_to_first_image_seconds"], 3)
    share = data["package_breakdown"]
    expected = (share["process_to_first_image_seconds"] - share["imports_torch_diffusers_transformers_seconds"]
                - share["component_loads_seconds"] - share["steady_image_seconds"])
    assert data["package_seconds"] == pytest.approx(max(expected, 0), abs=2e-3)
    assert share["imports_torch_diffusers_transformers_seconds"] > 0 and share["steady_image_seconds"] > 0
    assert data["page_cache"]["state"] == "warm" and data["page_cache"]["files"] > 5
    assert data["autotuned_kernels"] == 0 and data["coordesc_benchmarks"] == 0  # a warm start never tunes
    for result in (data, base):  # the named phases add up to the start: the unnamed rest is small
        total = result["process_to_first_image_seconds"]
        assert {"imports_seconds", "text_encoding_seconds", "denoising_seconds", "vae_seconds"} <= set(result["phases"])
        assert sum(result["phases"].values()) + result["other_seconds"] == pytest.approx(total, abs=0.05)
        assert abs(result["other_seconds"]) < 0.05 * total
    phases = data["phases"]
    assert phases["load_transformer_seconds"] > 0 and "optimize_seconds" in phases
    residual = phases["from_pretrained_other_seconds"] + phases["load_pipeline_other_seconds"] + \
        phases["first_image_other_seconds"]
    assert residual < 0.1 * data["process_to_first_image_seconds"]
    text = __import__("sd3plugin.cli.cmd_verify", fromlist=["x"]).summary(data, cold=False, code=0)
    assert "baseline (plain diffusers, eager)" in text and f"ratio {data['ratio']:.2f}" in text
    assert f"package_seconds {data['package_seconds']:.2f}" in text and "unnamed" in text


@needs_megacache
def test_activate_loads_an_installed_cache_once_per_process(shipped):
    root = shipped[0]
    first = activate(root)["cache"]
    assert len(first["megacache_loaded"]) == 1 and first["artifacts"].get("inductor", 0) > 0
    assert activate(root)["cache"]["megacache_loaded"] == []


def test_verify_cold_compiles_from_scratch_and_leaves_the_installed_cache_alone(shipped, capsys):
    """--cold is the reference for the warm start: an empty cache dir (inductor, Triton, FA4) in its place."""
    root, _, _, _, model_folder = shipped
    before = sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    code, data, text = _cli(capsys, "verify", "--cold", "--cache-dir", str(root), "--json",
                            f"model={model_folder}", *RUN)
    assert code == 0, text
    assert data["cold"] and data["fresh_compilations"] > 0 and data["fxgraph_cache_hit"] == 0
    assert not data["cache"]["megacache_loaded"] and not data["cache"]["installed_archive"]
    after = sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    assert after == before


def test_verify_text_names_the_attention_kernel_and_why_tuning_ran_again():
    from sd3plugin.cli.cmd_verify import summary

    result = {"shape": {"width": 1024, "height": 1024, "batch_size": 1}, "time_to_first_image_seconds": 27.9,
              "import_seconds": 11.0, "load_seconds": 9.3, "first_image_seconds": 7.4, "fresh_compilations": 0,
              "fxgraph_cache_hit": 2, "autograd_cache_hit": 2, "keep_coordesc": True,
              "attention": {"kernel": "fa4", "prewarm": {"state": "skipped: the FA4 cache already holds compiled kernels"}}}
    text = summary(result, cold=False, code=0)
    assert text.startswith("OK: 1024x1024 batch 1, time to first image 27.90 s")
    assert "attention fa4 (FA4 prewarm: skipped: the FA4 cache already holds compiled kernels)" in text
    assert "coordinate-descent" not in text
    text = summary({**result, "coordesc_tuning_benchmarks": 40, "keep_coordesc": False}, cold=False, code=5)
    assert text.startswith("COMPILED:") and "40 Triton kernel benchmarks" in text
    assert "SD3PLUGIN_KEEP_COORDESC=0" in text


# -- precompiled transformer blocks -----------------------------------------------------------------------
FIRST_IMAGE = textwrap.dedent('''
    import json, sys, torch
    from torch._dynamo.utils import counters
    import sd3plugin
    from sd3plugin.config import compose
    from sd3plugin.pipeline import load_pipeline
    cfg = compose(None, json.loads(sys.argv[1]))
    with sd3plugin.enabled(cfg):
        pipe = load_pipeline(cfg)
    latents = pipe(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    torch.save(latents, sys.argv[2])
    rep = sd3plugin.report(pipe)
    print(json.dumps({"precompiled": rep["precompiled"], "graphs": int(counters["stats"]["unique_graphs"]),
                      "fx_miss": int(counters["inductor"]["fxgraph_cache_miss"]), "status": rep["status"]}))
''')


def _first_image(cache, model_folder, out, precompiled: bool) -> dict:
    env = _env()
    env["SD3PLUGIN_PRECOMPILED"] = "1" if precompiled else "0"
    overrides = [f"model={model_folder}", f"cache_dir={cache}", *RUN]
    proc = subprocess.run([sys.executable, "-c", FIRST_IMAGE, json.dumps(overrides), str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def installed_copy(shipped, tmp_path):
    """A copy of the installed cache to damage (2 MB)."""
    copy = tmp_path / "cache"
    shutil.copytree(shipped[0], copy)
    return copy, shipped[4]


@needs_precompile
def test_fresh_processes_give_the_same_image_with_and_without_the_precompiled_blocks(installed_copy, tmp_path):
    cache, model_folder = installed_copy
    pre = _first_image(cache, model_folder, tmp_path / "pre.pt", precompiled=True)
    ind = _first_image(cache, model_folder, tmp_path / "ind.pt", precompiled=False)
    assert pre["status"] == ind["status"] == "compiled"
    assert pre["precompiled"]["used"] and pre["precompiled"]["misses"] == 0 and pre["graphs"] == 0
    assert not ind["precompiled"]["used"] and ind["graphs"] > 0 and ind["fx_miss"] == 0  # traced, cache served
    a, b = torch.load(tmp_path / "pre.pt"), torch.load(tmp_path / "ind.pt")
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4  # fp32 on CPU: kernel-order noise only


def _optimized(cache, model_folder):
    from diffusers import StableDiffusion3Pipeline

    import sd3plugin

    pipe = StableDiffusion3Pipeline.from_pretrained(model_folder)
    return sd3plugin.optimize(pipe, overrides=[f"cache_dir={cache}", f"model={model_folder}", *RUN])


def _index(cache):
    (path,) = cache.glob("entries/*/precompiled/index.json")
    return path, json.loads(path.read_text())


@needs_precompile
@pytest.mark.parametrize("damage", ["other_torch", "truncated", "garbage_with_a_valid_sha256"])
def test_a_mismatching_or_damaged_artefact_is_reported_and_not_loaded(installed_copy, damage):
    import sd3plugin

    cache, model_folder = installed_copy
    path, index = _index(cache)
    if damage == "other_torch":
        index["environment"]["torch"] = "2.0.0"
        path.write_text(json.dumps(index))
    for record in index["artefacts"]:
        block = path.parent / record["file"]
        if damage == "truncated":
            block.write_bytes(block.read_bytes()[:1000])
        elif damage == "garbage_with_a_valid_sha256":
            data = b"not a precompiled function" * 10
            block.write_bytes(data)
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if damage == "garbage_with_a_valid_sha256":
        path.write_text(json.dumps(index))
    pipe = _optimized(cache, model_folder)
    pre = sd3plugin.report(pipe)["precompiled"]
    assert pre["used"] is False and pre["artefacts"] == 0
    expected = {"other_torch": "torch 2.0.0 (artefacts) vs", "truncated": "sha256 mismatch",
                "garbage_with_a_valid_sha256": "cannot load it"}[damage]
    assert expected in pre["reason"], pre["reason"]
    assert sd3plugin.report(pipe)["status"] == "compiled"  # the inductor path is still there
    sd3plugin.undo(pipe)


@needs_precompile
def test_one_damaged_artefact_falls_back_for_its_blocks_only_and_warm_rebuilds_it(installed_copy):
    import sd3plugin
    from sd3plugin.apps.warm import _store_precompiled
    from sd3plugin.cache.manifest import environment

    cache, model_folder = installed_copy
    path, index = _index(cache)
    damaged, good = index["artefacts"]
    (path.parent / damaged["file"]).write_bytes(b"")  # truncated to nothing
    pipe = _optimized(cache, model_folder)
    pre = sd3plugin.report(pipe)["precompiled"]
    assert pre["used"] and pre["artefacts"] == 1
    assert pre["problems"] == [{"file": damaged["file"], "reason": pre["problems"][0]["reason"]}]
    assert "sha256 mismatch" in pre["problems"][0]["reason"]
    pipe(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="latent")
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "compiled" and rep["precompiled"]["hits"] > 0
    assert rep["precompiled"]["misses"] > 0 and "no precompiled block accepts" in rep["precompiled"]["miss_reason"]
    sd3plugin.undo(pipe)
    # the next warm: the damaged artefact is dropped and its key rebuilt (here: a stand-in for the build)
    fp = path.parent.parent.name
    rebuilt = ({k: v for k, v in damaged.items() if k not in ("file", "sha256", "size", "created")}, b"rebuilt")
    out = _store_precompiled(cache, fp, {"artefacts": [rebuilt], "sampled_keys": [damaged["key"]], "errors": [],
                                         "api": "x", "seconds": 0.0}, environment())
    assert out["dropped"] == [damaged["file"]] and out["kept"] == 1 and out["artefacts"] == 2
    _, after = _index(cache)
    assert good in after["artefacts"] and not (path.parent / damaged["file"]).exists()
