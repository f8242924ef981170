"""sd3plugin-bench on the tiny model (CPU): the table, ratios from real timings, recompile counts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from sd3plugin.apps.bench.options import BenchConfig, parse_variants, resolution_shapes, split_bench_overrides
from sd3plugin.apps.bench.runner import add_ratios, run_bench
from sd3plugin.apps.bench.timing import StepEvents
from sd3plugin.apps.bench.report import markdown
from sd3plugin.config import compose
from sd3plugin.errors import ConfigError

SHAPES = [64, 48]  # tiny: multiples of 4 up to 256; 64 is its default resolution (compiled at warm-up)


# -- arguments -----------------------------------------------------------------------------------------
def test_bench_overrides_are_split_and_typed():
    bench, rest = split_bench_overrides(["model=tiny", "bench.repeat=2", "+bench.multiple_resolutions=1",
                                         "bench.resolutions=[64,48]", "steps=3"])
    assert rest == ["model=tiny", "steps=3"]
    assert bench.repeat == 2 and bench.multiple_resolutions is True and bench.resolutions == [64, 48]


@pytest.mark.parametrize("arg, words", [
    ("bench.nope=1", ["bench.nope", "bench.repeat"]),
    ("bench.repeat=abc", ["invalid benchmark setting"]),
    ("bench.repeat=0", ["at least 1"]),
    ("bench.variants='a=mode=default; a=mode=none'", ["duplicate labels"]),
    ("bench.variants='model=sd3-medium'", ["shared by all variants"]),
    ("bench.variants='x=mode=default junk'", ["'junk' is not an override"]),
])
def test_bad_bench_settings_name_the_problem(arg, words):
    with pytest.raises(ConfigError) as err:
        split_bench_overrides([arg])
    for w in words:
        assert w in str(err.value)


def test_variant_labels():
    assert parse_variants("fp8=quant=x mode=default; mode.spec=cudagraphs") == [
        ("fp8", ["quant=x", "mode=default"]), ("mode.spec=cudagraphs", ["mode.spec=cudagraphs"])]
    assert parse_variants([""]) == [("configured", [])]
    assert parse_variants({"a": "mode=none"}) == [("a", ["mode=none"])]


def test_seed_resolutions_are_valid_for_sd3_and_checked():
    # 720 and 576 are multiples of 16 (45 and 36 patches of 16 px), so SD3 takes them as they are.
    shapes = resolution_shapes(BenchConfig(), "sd3-medium")
    assert len(shapes) == 49 and (720, 576) in shapes
    with pytest.raises(ConfigError, match="multiple of 16"):
        resolution_shapes(BenchConfig(resolutions=[1000]), "sd3-medium")


def test_default_resolutions_fit_the_model():
    """The multiple-resolution pass picks, by default, the seed's sizes the model takes (the tiny model
    takes 256 and less), so its own defaults never fail; sizes given explicitly are checked."""
    shapes = resolution_shapes(BenchConfig(square_only=True), "tiny")
    assert shapes and all(h <= 256 for h, _ in shapes) and (256, 256) in shapes
    with pytest.raises(ConfigError, match="height=1536"):
        resolution_shapes(BenchConfig(resolutions=[1536]), "tiny")


def test_missing_matplotlib_is_said_once(tmp_path, monkeypatch, caplog):
    from sd3plugin.apps.bench import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(report, "_SAID", [])
    data = {"variants": [], "model": "tiny", "width": 64, "height": 64, "versions": {}, "device": "cpu"}
    with caplog.at_level("WARNING", logger="sd3plugin"):
        assert [report.draw_chart(data, tmp_path / "bench.png") for _ in range(4)] == [False] * 4
    assert sum("matplotlib not installed" in r.getMessage() for r in caplog.records) == 1


def test_app_exits_2_on_a_bad_bench_key():
    res = subprocess.run([sys.executable, "-m", "sd3plugin.apps.bench", "bench.warmups=2"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown benchmark key bench.warmups" in res.stderr and "bench.warmup" in res.stderr


def test_legacy_flags_reach_the_bench_config():
    from sd3plugin.apps.run import prepare_argv

    bench, rest = split_bench_overrides(prepare_argv(
        ["--run_multiple_resolutions", "1", "--warmup-iterations", "2",
         "--compiler-config", '{"mode": "max-optimize", "dynamic": true}'], bench=True))
    assert bench.multiple_resolutions is True and bench.warmup == 2
    assert "mode.spec='max-optimize'" in rest


# -- timing and ratios ---------------------------------------------------------------------------------
def test_step_events_measure_the_time_between_steps(monkeypatch):
    from sd3plugin.apps.bench import timing

    clock = iter([10.0, 10.02, 10.06])  # a host clock read once per step end
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    ev = StepEvents("cpu")
    for _ in range(3):
        ev(None, 0, 0, {})
    assert ev.step_seconds() == pytest.approx([0.02, 0.04])


def test_ratios_and_failed_variants_in_the_table():
    rows = [{"label": "eager", "iterations_per_second": 10.0, "e2e_seconds": 2.0, "peak_memory_gib": 4.0,
             "warmup_compile_seconds": 1.0},
            {"label": "fast", "iterations_per_second": 15.0, "e2e_seconds": 1.5, "peak_memory_gib": 3.0,
             "warmup_compile_seconds": 30.0, "overrides": ["mode=default"]},
            {"label": "broken", "error": "CompileError: no", "overrides": ["mode=x"]}]
    add_ratios(rows)
    assert rows[1]["its_ratio"] == 1.5 and rows[1]["e2e_ratio"] == 0.75 and rows[1]["memory_ratio"] == 0.75
    md = markdown({"model": "tiny", "dtype": "torch.float32", "width": 64, "height": 64, "steps": 2,
                   "guidance_scale": 7.0, "device": "cpu", "command": "sd3plugin-bench", "versions": {},
                   "variants": rows})
    assert "| `fast` | 15.00 (1.50x) | 1.500 s (-25.0%)" in md
    assert "| `broken` | failed: CompileError: no |" in md
    assert "sd3plugin iteration speed | 15.00 it/s (+50.0%)" in md
    assert "(text encoders, 2 steps, VAE decode)" in md and "28 steps" not in md  # the real number of steps


# -- the whole benchmark on the tiny model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bench(tiny_path, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose(None, [f"model={tiny_path}", "steps=3", "mode=fast-compile", f"output_dir={out}",
                         f"cache_dir={cache_dir}"])
    bench = BenchConfig(variants=["static=mode=fast-compile", "dyn=mode=fast-compile dynamic=true"], repeat=2,
                        multiple_resolutions=True, resolutions=SHAPES, square_only=True, resolution_steps=2,
                        cache_warmup=False)
    torch._dynamo.reset()
    data = run_bench(cfg, bench)
    return data, out


@pytest.mark.slow
def test_bench_writes_the_table_json_and_chart(tiny_bench):
    data, out = tiny_bench
    assert [v["label"] for v in data["variants"]] == ["eager", "static", "dyn"]
    assert all("error" not in v for v in data["variants"]), [v.get("error") for v in data["variants"]]
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["variants"][1]["its_ratio"] == pytest.approx(data["variants"][1]["its_ratio"])
    md = (out / "bench.md").read_text()
    for label in ("eager", "static", "dyn"):
        assert f"| `{label}` |" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "grid_static.png").is_file()
    assert not (out / "caches").exists() or not any((out / "caches").iterdir())  # fresh caches removed


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_ratios_come_from_the_measured_timings(tiny_bench):
    data, _ = tiny_bench
    eager = data["variants"][0]
    for v in data["variants"]:
        assert len(v["e2e_all_seconds"]) == 2 and all(s > 0 for s in v["e2e_all_seconds"])
        assert v["iterations_per_second"] == pytest.approx(1 / v["step_seconds_median"])
        assert v["its_ratio"] == pytest.approx(v["iterations_per_second"] / eager["iterations_per_second"])
        assert v["e2e_ratio"] == pytest.approx(v["e2e_seconds"] / eager["e2e_seconds"])
    assert eager["its_ratio"] == 1.0
    compiled = data["variants"][1]
    assert compiled["status"] == "compiled" and compiled["graphs_first_shape"] >= 1
    assert compiled["quality"]["latents_rel_error"] < 1e-3  # compiled float32 matches eager


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_recompile_counts_per_shape(tiny_bench):
    data, _ = tiny_bench
    _, static, dyn = data["variants"]
    from diffusers import SD3Transformer2DModel

    # Static shapes compile one graph per kind of block (the last one is context_pre_only) per new shape.
    kinds = {b.context_pre_only for b in SD3Transformer2DModel.from_pretrained(
        data["model_folder"], subfolder="transformer").transformer_blocks}
    s = {(r["height"], r["width"]): r for r in static["resolutions"]}
    d = {(r["height"], r["width"]): r for r in dyn["resolutions"]}
    assert s[(64, 64)]["new_graphs"] == 0 and d[(64, 64)]["new_graphs"] == 0  # compiled at warm-up
    assert s[(48, 48)]["new_graphs"] == len(kinds) == 2  # static shapes: each kind of block recompiles
    assert d[(48, 48)]["new_graphs"] == 0  # dynamic=true: the same graphs serve the new shape
    assert all(r["first_call_seconds"] > 0 for r in static["resolutions"] + dyn["resolutions"])
    md = markdown(data)
    assert "| 48x48 |" in md and "0 in all" in md and "2 in all" in md


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_bench_config_round_trips_into_json(tiny_bench):
    data, _ = tiny_bench
    assert OmegaConf.create(data["bench"]).resolutions == SHAPES
    assert data["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_warm_start_from_a_shipped_cache(tiny_path, tmp_path):
    """bench.cache_warmup runs sd3plugin-cache warm, pack, install and verify in fresh processes: the
    installed cache serves the first image without compiling."""
    cfg = compose(None, [f"model={tiny_path}", "steps=2", f"output_dir={tmp_path}",
                         f"cache_dir={tmp_path / 'cache'}"])
    bench = BenchConfig(variants=["fast=mode=fast-compile"], eager=False, repeat=1, quality=False, chart=False,
                        cache_warmup=True)
    torch._dynamo.reset()
    data = run_bench(cfg, bench)
    start = data["variants"][0]["cache_warm_start"]
    assert "error" not in start, start
    assert start["fresh_compilations"] == 0
    assert start["precompiled_used"] or start["fxgraph_cache_hit"] >= 1  # precompiled blocks: nothing to look up
    assert start["archive_bytes"] > 0 and start["first_call_seconds"] > 0
    assert "0 compiled)" in (tmp_path / "bench.md").read_text()
    assert not any((tmp_path / "caches").iterdir())  # nothing left behind without bench.keep_caches


# -- the cudagraphs token: one CUDA graph of the whole transformer step ------------------------------------
def test_cudagraphs_token_uses_whole_step_graphs_not_inductor_trees():
    import dataclasses

    from sd3plugin.backends.inductor import InductorBackend
    from sd3plugin.plan import make_plan

    backend = InductorBackend()
    plan = make_plan(compose(None, ["mode.spec=max-optimize:cudagraphs", "device=cpu"]))
    assert "triton.cudagraphs" not in backend.options(plan) and not backend.whole_step_graphs(plan)
    on_gpu = dataclasses.replace(plan, device="cuda")
    assert backend.whole_step_graphs(on_gpu) and "triton.cudagraphs" not in backend.options(on_gpu)
    explicit = dataclasses.replace(on_gpu, options={"triton.cudagraphs": True})
    assert not backend.whole_step_graphs(explicit)  # asked for inductor's own trees: no double capture


def test_cuda_graph_runner_passes_cpu_calls_through():
    from sd3plugin.backends.cudagraph import CudaGraphForward, install, uninstall

    module = torch.nn.Linear(4, 3)
    runner = install(module)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(module(x), torch.nn.functional.linear(x, module.weight, module.bias))
    info = runner.info()
    assert info.pop("capture_seconds") == 0
    assert info == {"graphs": 0, "replays": 0, "failed_signatures": 0, "invalidated": 0, "suspended": None}
    uninstall(module)
    assert module._compiled_call_impl is None and isinstance(runner, CudaGraphForward)


@pytest.mark.gpu
def test_cuda_graph_runner_replays_per_shape_and_matches_plain_calls():
    from sd3plugin.backends.cudagraph import install

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda().half()
    runner = install(module, warmup=2)
    with torch.no_grad():
        for rows in (5, 5, 5, 5, 9, 9, 9, 9, 5):
            x = torch.randn(rows, 64, device="cuda", dtype=torch.half)  # fresh inputs every call
            out = module(x)
            ref = module._call_impl(x)
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    # per shape: 2 plain warm-up calls, then capture + replay; 5 rows: calls 3, 4, 9; 9 rows: calls 7, 8
    info = runner.info()
    assert info.pop("capture_seconds") > 0
    assert info == {"graphs": 2, "replays": 5, "failed_signatures": 0, "invalidated": 0, "suspended": None}


def test_a_variant_needing_another_dtype_is_refused_before_loading(monkeypatch):
    from sd3plugin.apps.bench import options as bench_mod

    monkeypatch.setattr("sd3plugin.config.quant_presets.preferred_dtype", lambda q: "bfloat16" if q == "int8_dynamic" else None)
    cfg = compose(None, ["model=tiny", "device=cpu"])
    composed = [("q", compose(cfg, ["quant=int8_dynamic"]), ["quant=int8_dynamic"])]
    with pytest.raises(ConfigError, match="needs dtype bfloat16 .* set dtype=bfloat16 on the command line"):
        bench_mod.check_shared_dtype(cfg, composed, "cpu")
    bench_mod.check_shared_dtype(compose(None, ["model=tiny", "device=cpu", "dtype=bfloat16"]),
                                 [("q", compose(None, ["model=tiny", "device=cpu", "dtype=bfloat16",
                                                       "quant=int8_dynamic"]), [])], "cpu")


def test_variant_command_overrides_rebuild_the_config():
    """A fresh process (cold start, shipped-cache start) must run exactly the variant: the overrides it is
    given compose back to the same settings, attention kernel and quantization layer selection included."""
    from sd3plugin.apps.bench.coldstart import variant_command_overrides
    from sd3plugin.config import compose

    cfg = compose(None, ["attention=sdpa", "quant=int8_dynamic", "quant.exclude=[proj_out,'*.ff_context.*']",
                         "mode=max-speed", "negative_prompt='blurry, it\\'s dark'", "height=128", "width=192",
                         "compile_text_encoders=true"])
    again = compose(None, variant_command_overrides(cfg))
    for key in ("attention", "backend", "fuse_qkv", "compile_vae", "compile_text_encoders", "negative_prompt",
                "height", "width"):
        assert again[key] == cfg[key], key
    fp8 = compose(None, ["quant=fp8_e4m3_e4m3_dynamic", "device=cuda", "fp8_fused_activation=true"])
    assert compose(None, variant_command_overrides(fp8)).fp8_fused_activation is True
    assert again.quant == cfg.quant and again.mode.spec == cfg.mode.spec


def test_bench_names_the_folder_it_wrote(tiny_path, tmp_path, capsys):
    out = tmp_path / "bench-out"
    cfg = compose(None, [f"model={tiny_path}", "steps=2", f"output_dir={out}", "device=cpu"])
    bench = BenchConfig(variants=[], repeat=1, cache_warmup=False, quality=False, chart=False)
    data = run_bench(cfg, bench)
    assert [v["label"] for v in data["variants"]] == ["eager"]
    printed = capsys.readouterr().out
    assert f"sd3plugin-bench: wrote bench.md, bench.json to {out.resolve()}" in printed
    assert "(text encoders, 2 steps, VAE decode)" in (out / "bench.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("sd3plugin.compat.cache_dit", fromlist=["x"]).available(),
                    reason="cache-dit not installed (extra 'cache')")
def test_step_cache_variants_against_the_uncached_image_of_the_same_seed(tiny_path, tmp_path):
    """bench.step_cache adds LABEL+PRESET siblings; each is compared with its own uncached variant: speed-up,
    PSNR/SSIM, reused block computations (a loose threshold: random weights change a lot between steps)."""
    cfg = compose(None, [f"model={tiny_path}", "steps=10", f"output_dir={tmp_path}", "device=cpu"])
    bench = BenchConfig(variants=["plain=backend=eager step_cache.threshold=5"], step_cache="fbcache,dbcache",
                        repeat=1, cache_warmup=False, chart=False, fresh_cache=False)
    data = run_bench(cfg, bench)
    rows = {v["label"]: v for v in data["variants"]}
    assert list(rows) == ["eager", "plain", "plain+fbcache", "plain+dbcache"], [v.get("error") for v in rows.values()]
    for label in ("plain+fbcache", "plain+dbcache"):
        sc = rows[label]["step_cache"]
        assert sc["against"] == "plain" and sc["speedup_e2e"] > 0 and sc["speedup_its"] > 0
        assert sc["last_call"]["reused_block_computations_per_image"] == len(sc["last_call"]["cached_steps"]) > 0
        assert sc["quality"]["images_psnr_db"] < float("inf") and 0 < sc["quality"]["images_ssim"] < 1
        # LPIPS / CLIP score: a number where the models are here, else the reason (never a download)
        assert ("images_lpips" in sc["quality"]) != ("images_lpips_skipped" in sc["quality"])
        assert ("clip_score" in sc["quality"]) != ("clip_score_skipped" in sc["quality"])
    assert "step_cache" not in rows["plain"] and "step_cache" not in rows["eager"]
    md = (tmp_path / "bench.md").read_text()
    assert "| `plain+fbcache` | `plain` | 2 / 10 | 2 / 20 |" in md


def test_bench_step_cache_names_only_presets():
    assert split_bench_overrides(["bench.step_cache=all"])[0].step_cache == "all"
    assert split_bench_overrides(["bench.step_cache=dbcache,fbcache"])[0].step_cache == ["dbcache", "fbcache"]
    with pytest.raises(ConfigError, match="bench.step_cache names 'fast', not step-cache presets; valid: dbcache"):
        split_bench_overrides(["bench.step_cache=fast"])
