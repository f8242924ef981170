"""step_cache on the tiny pipeline (a 10-block transformer, so every preset's Fn fits): ``none`` and a zero
threshold are plain diffusers' latents bit for bit, each preset reuses block computations (and says how many
in report(pipe)), LoRA with a step cache on gives exactly what cache-dit gives on plain diffusers with the
same LoRA, undo() gives back plain diffusers, and the conflicts are refused with one line naming the fix.

Random weights change a lot from step to step (residual differences around 0.3), so the reuse tests raise the
threshold: they check that the preset's knobs reach cache-dit, not the image quality (docs/step-cache.md)."""
import pytest
import torch

import sd3plugin
from sd3plugin.compat import cache_dit as seam
from sd3plugin.config import compose
from sd3plugin.config.step_cache import STEP_CACHE_PRESETS
from sd3plugin.errors import ConfigError

from .conftest import make_lora

pytestmark = pytest.mark.skipif(not seam.available(), reason="cache-dit not installed (extra 'cache')")
STEPS = 10
BLOCKS = 10
LOOSE = "step_cache.threshold=5.0"  # random weights: reuse whenever cache-dit's warm-up and caps allow
EAGER = ["backend=eager"]


def call(**kw):
    return dict(prompt="a red cube", num_inference_steps=STEPS, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw)


@pytest.fixture(scope="module")
def deep(tiny_path):
    """The tiny pipeline with a 10-block transformer (random weights), and its plain latents. One thread: the
    tiny model's many small ops run several times slower when threads contend for a busy machine's cores."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": BLOCKS}).eval()
    pipe.set_progress_bar_config(disable=True)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    yield pipe, state, pipe(**call()).images
    torch.set_num_threads(threads)


@pytest.fixture
def pipe(deep):
    """The deep pipeline as plain diffusers; whatever a test optimized is undone after it."""
    p, state, _ = deep
    yield p
    sd3plugin.undo(p)
    if seam.is_enabled(p):
        seam.disable(p)
    if getattr(p.transformer, "_hf_peft_config_loaded", False):
        p.unload_lora_weights()
    p.transformer.load_state_dict(state)


@pytest.fixture
def plain(deep):
    return deep[2]


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_none_and_a_zero_threshold_are_plain_diffusers(pipe, plain):
    sd3plugin.optimize(pipe, overrides=EAGER)
    exact(pipe(**call()).images, plain)
    assert sd3plugin.report(pipe)["step_cache"] == {"name": "none"} and not seam.is_enabled(pipe)
    sd3plugin.undo(pipe)
    sd3plugin.optimize(pipe, overrides=[*EAGER, "step_cache=dbcache", "step_cache.threshold=0"])
    exact(pipe(**call()).images, plain)
    rep = sd3plugin.report(pipe)["step_cache"]
    assert rep["last_call"] == {"steps": STEPS, "cached_steps": [], "reused_block_computations_per_image": 0,
                                "block_computations_per_image": STEPS * BLOCKS}


@pytest.mark.parametrize("name", [n for n in STEP_CACHE_PRESETS if n != "none"])
def test_each_preset_reuses_block_computations_and_reports_them(pipe, plain, name):
    preset = STEP_CACHE_PRESETS[name]
    sd3plugin.optimize(pipe, overrides=[*EAGER, f"step_cache={name}", LOOSE])
    out = pipe(**call()).images
    rep = sd3plugin.report(pipe)["step_cache"]
    assert rep["settings"] == {**preset.knobs(), "threshold": 5.0} and rep["blocks"] == BLOCKS
    last = rep["last_call"]
    cached = last["cached_steps"]
    assert cached and min(cached) >= preset.warmup  # warm-up steps are always computed
    if preset.max_continuous > 0:
        assert all(not all(s + i in cached for i in range(preset.max_continuous + 1)) for s in cached)
    assert last["reused_block_computations_per_image"] == len(cached) * (BLOCKS - preset.fn - preset.bn) > 0
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_lora_with_a_step_cache_is_what_cache_dit_gives_on_diffusers(pipe, tmp_path):
    lora = make_lora(pipe.transformer, tmp_path / "lora", 1, ("to_q", "to_v", "ff.net.0.proj"))
    preset = STEP_CACHE_PRESETS["fbcache"]
    pipe.load_lora_weights(lora, adapter_name="a")
    seam.enable(pipe, seam.StepCacheSettings(**{**preset.knobs(), "threshold": 5.0}))
    want = pipe(**call()).images
    want_cached = seam.cached_steps(pipe)
    seam.disable(pipe)
    pipe.unload_lora_weights()
    sd3plugin.optimize(pipe, overrides=[*EAGER, "step_cache=fbcache", LOOSE])
    pipe.load_lora_weights(lora, adapter_name="a")  # after optimizing, as users do
    exact(pipe(**call()).images, want)
    assert sd3plugin.report(pipe)["step_cache"]["last_call"]["cached_steps"] == want_cached != []


def test_undo_gives_back_plain_diffusers(pipe, plain):
    cls = type(pipe)
    sd3plugin.optimize(pipe, overrides=[*EAGER, "step_cache=taylorseer", LOOSE])
    assert type(pipe) is not cls and type(pipe).__name__ == cls.__name__  # cache-dit patches its own class
    assert not torch.equal(pipe(**call()).images, plain)
    sd3plugin.undo(pipe)
    assert type(pipe) is cls and "forward" not in pipe.transformer.__dict__ and not seam.is_enabled(pipe)
    assert not hasattr(type(pipe), "_original_call")  # the class every other pipeline shares is untouched
    exact(pipe(**call()).images, plain)
    assert sd3plugin.report(pipe) == {"optimized": False}


@pytest.mark.parametrize("overrides, says", [
    (["step_cache=dbcache", "mode=max-speed"], "cannot run with CUDA graphs (mode=max-speed: token 'cudagraphs')"),
    (["step_cache=taylorseer", "step_cache.bn=0"], "needs step_cache.bn >= 1"),
    (["step_cache=dbcache", "parallel=cfg2"], "is not wired into the xDiT path (parallel=cfg2)"),
    (["step_cache=dbcache", "step_cache.max_cached=0"], "must be -1 (no limit) or at least 1"),
    (["step_cache=fast"], "unknown step_cache option 'fast'; valid options: dbcache, dbcache_fast, fbcache, none"),
])
def test_contradictions_fail_at_composition(overrides, says):
    with pytest.raises(ConfigError, match=None) as err:
        compose(overrides=overrides)
    assert says in str(err.value), str(err.value)


def test_what_cache_dit_cannot_cache_is_refused_naming_the_fix(pipe, monkeypatch):
    with pytest.raises(ConfigError, match="needs the pipeline: cache-dit caches across its denoising loop"):
        sd3plugin.optimize(pipe.transformer, overrides=[*EAGER, "step_cache=fbcache"])
    with pytest.raises(ConfigError, match="this transformer has 10 blocks, too few for step_cache.bn=9"):
        sd3plugin.optimize(pipe, overrides=[*EAGER, "step_cache=taylorseer", "step_cache.bn=9"])
    assert not seam.is_enabled(pipe) and sd3plugin.report(pipe) == {"optimized": False}  # nothing left behind
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cache_dit" else real(n, *a))
    with pytest.raises(ConfigError, match=r'needs cache-dit, which is not installed; pip install "sd3plugin\[cache\]"'):
        sd3plugin.optimize(pipe, overrides=[*EAGER, "step_cache=dbcache"])


def test_a_small_transformer_gets_a_lower_fn_and_the_report_says_so(tiny_pipe):
    sd3plugin.optimize(tiny_pipe, overrides=[*EAGER, "step_cache=dbcache", LOOSE])
    try:
        tiny_pipe(**call())
        rep = sd3plugin.report(tiny_pipe)["step_cache"]
        assert rep["settings"]["fn"] == 1 and rep["reusable_blocks"] == 1  # 2 blocks: F1, one to reuse
        assert rep["last_call"]["reused_block_computations_per_image"] == len(rep["last_call"]["cached_steps"]) > 0
    finally:
        sd3plugin.undo(tiny_pipe)


@pytest.mark.slow
def test_compiled_blocks_with_a_step_cache_do_not_recompile_from_step_to_step(pipe):
    """Regional compile under cache-dit: the blocks compile once, without graph breaks; later steps (reused
    or computed) and a second image compile nothing more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sd3plugin.optimize(pipe, overrides=["backend=inductor", "device=cpu", "step_cache=fbcache", LOOSE])
    pipe(**call())
    pipe(**call())
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "compiled" and rep["compilations"] > 0, rep.get("error")
    assert rep["recompilations"] == 0
    assert rep["step_cache"]["last_call"]["cached_steps"]
    assert not counters["graph_break"], dict(counters["graph_break"])
