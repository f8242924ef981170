"""The start-up breakdown: ``report(pipe)["startup"]`` and the pieces it is made of."""
from __future__ import annotations

import time

import torch
import torch._dynamo

import sd3plugin
from sd3plugin.compat import torch as tcompat
from sd3plugin.startup import parse_importtime, summary_line

IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:    500000 |     500000 |   torch.nn
import time:    700000 |    1200000 | torch
import time:     50000 |      50000 |     diffusers.utils.x
import time:    250000 |     300000 |   diffusers
import time:     20000 |     320000 | sd3plugin
noise that is not an importtime line
"""


def test_parse_importtime_adds_each_module_to_its_package():
    imports = parse_importtime(IMPORTTIME, top=2)
    # own times: torch 0.7 + torch.nn 0.5 s; diffusers 0.25 + diffusers.utils.x 0.05 s (imported by sd3plugin)
    assert imports["top"] == [{"module": "torch", "seconds": 1.2}, {"module": "diffusers", "seconds": 0.3}]
    assert imports["seconds"] == 1.52  # every module's own time once


def test_compile_breakdown_splits_dynamo_inductor_kernels_and_autotuning():
    before = {tcompat.DYNAMO_TIMER: (1.0, 1), tcompat.BACKEND_TIMER: (0.5, 1), "#graphs": (0.0, 1)}
    after = {tcompat.DYNAMO_TIMER: (5.0, 2), tcompat.BACKEND_TIMER: (3.5, 2), tcompat.KERNEL_LOAD_TIMER: (1.0, 3),
             tcompat.AUTOTUNE_TIMERS[1]: (0.75, 4), "#coordesc_benchmarks": (0.0, 12), "#graphs": (0.0, 2)}
    assert tcompat.compile_breakdown(before, after) == {
        "dynamo_tracing_seconds": 1.0, "inductor_compile_seconds": 2.0, "kernel_loading_seconds": 1.0,
        "autotuning_seconds": 0.75, "autotuned_kernels": 4, "coordesc_benchmarks": 12, "graphs_compiled": 1}
    assert set(tcompat.compile_metrics()) >= {"#graphs", "#coordesc_benchmarks"}  # this torch has the timers


def test_report_splits_the_first_image_of_a_compiled_pipeline(tiny_path, cache_dir):
    from sd3plugin.config import compose
    from sd3plugin.pipeline import load_pipeline

    torch._dynamo.reset()
    cfg = compose(None, [f"model={tiny_path}", f"cache_dir={cache_dir}", "backend=inductor", "steps=2",
                         "height=64", "width=64"])
    with sd3plugin.enabled(cfg):
        pipe = load_pipeline(cfg)
    started = time.perf_counter()
    pipe(prompt="a cube", num_inference_steps=2, height=64, width=64, output_type="pil",
         generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - started
    startup = sd3plugin.report(pipe)["startup"]
    assert set(startup["load"]["components"]) >= {"transformer", "vae", "text_encoder", "scheduler"}
    assert startup["load"]["seconds"] >= max(startup["load"]["components"].values())
    assert startup["load"]["device_map"] is None  # CPU: loaded as before
    first = startup["first_call"]
    assert first["graphs_compiled"] >= 1 and first["dynamo_tracing_seconds"] > 0
    assert first["seconds"] >= first["dynamo_tracing_seconds"]
    image = startup["first_image"]
    assert image["denoising_seconds"] >= first["seconds"]  # the first transformer call is part of denoising
    parts = image["text_encoding_seconds"] + image["denoising_seconds"] + image["vae_seconds"]
    assert 0 < parts <= wall
    assert "cache" in startup and startup["setup_seconds"] > 0
    line = summary_line(startup)
    assert line.startswith("start-up: load") and "tracing" in line and "VAE" in line
    # a second image is not timed again
    pipe(prompt="a cube", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert sd3plugin.report(pipe)["startup"]["first_image"] == image
    sd3plugin.undo(pipe)
    assert "encode_prompt" not in pipe.__dict__ and "decode" not in pipe.vae.__dict__


def test_baseline_ratio_and_package_share_come_from_the_measured_totals():
    from sd3plugin.apps.baseline import compare, summary_text

    ours = {"process_to_first_image_seconds": 20.0, "steady_image_seconds": 1.5,
            "startup": {"imports": {"top": [{"module": "torch", "seconds": 7.0}, {"module": "sympy", "seconds": 1.9},
                                            {"module": "diffusers", "seconds": 1.0},
                                            {"module": "transformers", "seconds": 1.2}]},
                        "load": {"components": {"transformer": 2.0, "text_encoder_3": 1.9}}}}
    base = {"process_to_first_image_seconds": 25.0, "import_seconds": 9.0, "load_seconds": 8.0,
            "first_image_seconds": 3.0}
    got = compare(ours, base)
    assert got["ratio"] == 0.8
    # 20 - (7 + 1 + 1.2 imports of torch/diffusers/transformers) - 3.9 weights - 1.5 image: sympy is ours
    assert got["package_seconds"] == 5.4
    assert got["package_breakdown"]["imports_torch_diffusers_transformers_seconds"] == 9.2
    line = summary_text({**ours, **got, "baseline": base, "page_cache": {"state": "dropped"}})
    assert "ratio 0.80" in line and "package_seconds 5.40" in line and "page cache dropped" in line


def test_page_cache_states_touch_only_the_model_folder(tmp_path):
    from sd3plugin.apps.baseline import set_page_cache

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "w.safetensors").write_bytes(b"x" * 4096)
    (tmp_path / "model_index.json").write_text("{}")
    assert set_page_cache(str(tmp_path), "warm")["files"] == 2
    dropped = set_page_cache(str(tmp_path), "dropped", whole_machine=False)
    assert dropped == {**dropped, "state": "dropped", "files": 2, "how": "posix_fadvise DONTNEED"}
    assert (tmp_path / "vae" / "w.safetensors").read_bytes() == b"x" * 4096  # nothing lost
