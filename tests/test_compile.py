"""Inductor backend on the tiny pipeline: output equal to eager, dynamic shapes, on_error both ways."""
import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusion3Pipeline

import sd3plugin
from sd3plugin.backends import register_backend, unregister_backend
from sd3plugin.backends.inductor import InductorBackend

from .conftest import tiny_call

# fp32 on CPU: inductor's fused kernels reorder float sums; 1e-4 of the latents' scale is far below any
# visible difference and far above what a wrong graph gives (order 1).
RTOL = 1e-4


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def eager_latents(tiny_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    return {(h, w): pipe(**tiny_call(height=h, width=w)).images for h, w in [(64, 64), (48, 80), (96, 32)]}


def test_compiled_equals_eager(tiny_path, cache_dir, eager_latents):
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=[f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)
    assert rep["backend"] == "inductor" and rep["status"] == "compiled", rep
    assert rep["compiled_modules"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert rep["fused_qkv"] is True
    assert rep["inductor_cache_dir"].startswith(str(cache_dir))
    out = pipe(**tiny_call()).images
    assert _unique_graphs() >= 1  # really compiled
    assert _rel_err(out, eager_latents[(64, 64)]) < RTOL
    # state dict keys unchanged by regional compilation (no _orig_mod prefixes)
    assert not any("_orig_mod" in k for k in pipe.transformer.state_dict())
    # optimize twice is a no-op
    assert sd3plugin.optimize(pipe) is pipe and sd3plugin.report(pipe)["status"] == "compiled"
    sd3plugin.undo(pipe)
    assert sd3plugin.report(pipe) == {"optimized": False}
    assert all(b._compiled_call_impl is None for b in pipe.transformer.transformer_blocks)


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_dynamic_resolutions_do_not_recompile_per_shape(tiny_path, cache_dir, eager_latents):
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["dynamic=true", f"cache_dir={cache_dir}"])
    first = pipe(**tiny_call(height=64, width=64)).images
    after_first = _unique_graphs()
    outs = {(h, w): pipe(**tiny_call(height=h, width=w)).images for h, w in [(48, 80), (96, 32)]}
    assert _unique_graphs() - after_first <= 1, "dynamic=true recompiled for each new resolution"
    assert _rel_err(first, eager_latents[(64, 64)]) < RTOL
    for shape, out in outs.items():
        assert _rel_err(out, eager_latents[shape]) < RTOL


@pytest.mark.slow
def test_static_shapes_do_recompile(tiny_path, cache_dir):
    """The counter above is meaningful: with dynamic=false every new resolution compiles again."""
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["dynamic=false", "mode=none", f"cache_dir={cache_dir}"])
    pipe(**tiny_call(height=64, width=64, num_inference_steps=1))
    after_first = _unique_graphs()
    pipe(**tiny_call(height=48, width=80, num_inference_steps=1))
    assert _unique_graphs() > after_first


BAD_OPTION = "+backend_options.not_a_real_inductor_option=1"


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "sd3plugin" and r.levelname == "WARNING"]


def test_on_error_fallback_at_setup(tiny_path, eager_latents, caplog):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    sd3plugin.optimize(pipe, overrides=["backend=inductor", BAD_OPTION])
    assert len(_warnings(caplog)) == 1 and "compilation failed" in _warnings(caplog)[0]
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "fallback" and "not_a_real_inductor_option" in rep["error"]
    assert rep["compiled_modules"] == []
    assert all(b._compiled_call_impl is None for b in pipe.transformer.transformer_blocks)
    assert torch.equal(pipe(**tiny_call()).images, eager_latents[(64, 64)])


def test_on_error_raise_at_setup_leaves_pipeline_untouched(tiny_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    with pytest.raises(sd3plugin.CompileError, match="not_a_real_inductor_option"):
        sd3plugin.optimize(pipe, overrides=["backend=inductor", "on_error=raise", BAD_OPTION])
    assert all(b._compiled_call_impl is None for b in pipe.transformer.transformer_blocks)
    assert "forward" not in pipe.transformer.__dict__


class _Boom(RuntimeError):
    pass


def _failing_backend(gm, example_inputs):
    raise _Boom("planted compiler failure")


@pytest.fixture
def broken_backend():
    @register_backend("broken")
    class BrokenBackend(InductorBackend):
        def compile(self, transformer, plan):
            for block in transformer.transformer_blocks:
                block.compile(backend=_failing_backend)
            return {"compiled_modules": [f"transformer_blocks.{i}" for i in
                                         range(len(transformer.transformer_blocks))]}
    from sd3plugin.config import schema
    schema.BACKENDS = schema.BACKENDS + ("broken",)
    yield
    schema.BACKENDS = tuple(b for b in schema.BACKENDS if b != "broken")
    unregister_backend("broken")


def test_on_error_fallback_at_first_call(tiny_path, eager_latents, broken_backend, caplog):
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path), overrides=["backend=broken"])
    assert sd3plugin.report(pipe)["status"] == "compiled"
    out = pipe(**tiny_call()).images
    warned = _warnings(caplog)
    assert len(warned) == 1 and "compilation failed (first call)" in warned[0]  # one warning, not one per step
    assert "_Boom: planted compiler failure" in warned[0]
    rep = sd3plugin.report(pipe)
    assert rep["status"] == "fallback" and "planted compiler failure" in rep["error"]
    assert torch.equal(out, eager_latents[(64, 64)])


def _interrupted_backend(gm, example_inputs):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:  # what a compiler that wraps errors makes of a Ctrl-C
        raise RuntimeError("compile worker stopped") from exc


def test_ctrl_c_while_compiling_is_not_a_compile_failure(tiny_path, broken_backend):
    """on_error=fallback falls back from compile failures, not from a Ctrl-C that a compiler wrapped."""
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path), overrides=["backend=broken"])
    for block in pipe.transformer.transformer_blocks:
        block.compile(backend=_interrupted_backend)
    with pytest.raises(KeyboardInterrupt):
        pipe(**tiny_call(num_inference_steps=1))
    assert sd3plugin.report(pipe)["status"] == "compiled"


def test_on_error_raise_at_first_call(tiny_path, broken_backend):
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["backend=broken", "on_error=raise"])
    with pytest.raises(sd3plugin.CompileError, match="planted compiler failure"):
        pipe(**tiny_call())
    # the failed compile was undone: the pipeline still works eagerly afterwards
    assert all(b._compiled_call_impl is None for b in pipe.transformer.transformer_blocks)
    pipe(**tiny_call(num_inference_steps=1))


def test_unavailable_backend(tiny_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    with pytest.raises(sd3plugin.BackendUnavailableError, match="backend='nexfort' cannot run here"):
        sd3plugin.optimize(pipe, overrides=["backend=nexfort", "on_error=raise"])
    assert "forward" not in pipe.transformer.__dict__
    sd3plugin.optimize(pipe, overrides=["backend=nexfort"])
    rep = sd3plugin.report(pipe)
    assert rep["backend"] == "eager" and rep["backend_reason"].startswith("fallback to eager")


def test_optimize_rejects_non_sd3():
    with pytest.raises(sd3plugin.ConfigError, match="expects an SD3 pipeline"):
        sd3plugin.optimize(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_sd3_5_blocks_and_vae_decoder_compile(tmp_path, cache_dir):
    """SD3.5 transformers (RMS qk-norm, dual attention) compile regionally too, with fused Q/K/V (our
    processor applies the q/k norm after the split; diffusers' fused processor would drop it);
    compile_vae=true compiles the VAE decoder. Outputs match eager within RTOL."""
    from sd3plugin.models import save_random_pipeline

    path = save_random_pipeline("tiny-sd3.5", tmp_path / "tiny35")
    ref = StableDiffusion3Pipeline.from_pretrained(path)(**tiny_call(output_type="pt", num_inference_steps=2)).images
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(path),
                              overrides=["compile_vae=true", "mode=fast-compile", f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)
    assert rep["compiled_modules"] == ["transformer_blocks.0", "transformer_blocks.1", "vae.decoder"]
    assert pipe.transformer.transformer_blocks[0].attn2 is not None  # dual attention block
    assert rep["fused_qkv"] is True
    assert rep["attention"]["kernel"] == "sdpa" and "CPU" in rep["attention"]["reason"]
    assert rep["attention"]["modules"] == 3  # two joint attentions and block 0's second (MMDiT-X) one
    attn = pipe.transformer.transformer_blocks[0].attn
    assert attn.to_qkv.weight.data_ptr() == attn.to_q.weight.data_ptr()  # views: no extra memory
    out = pipe(**tiny_call(output_type="pt", num_inference_steps=2)).images
    assert _rel_err(out, ref) < RTOL
    sd3plugin.undo(pipe)
    assert "decode" not in pipe.vae.__dict__ and pipe.vae.decoder._compiled_call_impl is None


TEXT_LAYERS = ["text_encoder.text_model.encoder.layers", "text_encoder_2.text_model.encoder.layers",
               "text_encoder_3.encoder.block"]


def _encoder_layers(pipe, name):
    enc, path = name.split(".", 1)
    m = getattr(pipe, enc)
    for part in path.split("."):
        m = getattr(m, part)
    return getattr(pipe, enc), list(m)


def test_text_encoders_compiled_and_undone(tiny_path, cache_dir):
    """compile_text_encoders=true compiles each encoder's layers (CLIP's and T5's, regionally) behind a
    guard on the encoder's forward; undo() gives the encoders back as they were (nothing runs here: the
    compilation happens at the first call, tested in the slow lane)."""
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["compile_text_encoders=true", "mode=fast-compile", f"cache_dir={cache_dir}"])
    rep = sd3plugin.report(pipe)
    assert rep["compiled_modules"][-3:] == TEXT_LAYERS and "compile_text_encoders" in rep["transforms"]
    for name in TEXT_LAYERS:
        encoder, layers = _encoder_layers(pipe, name)
        assert "forward" in encoder.__dict__ and layers
        assert all(layer._compiled_call_impl is not None for layer in layers)
    sd3plugin.undo(pipe)
    for name in TEXT_LAYERS:
        encoder, layers = _encoder_layers(pipe, name)
        assert "forward" not in encoder.__dict__
        assert all(layer._compiled_call_impl is None for layer in layers)
    plain = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                               overrides=["mode=fast-compile", f"cache_dir={cache_dir}"])
    assert not any(m.startswith("text_encoder") for m in sd3plugin.report(plain)["compiled_modules"])
    sd3plugin.undo(plain)


@pytest.mark.slow
def test_compiled_text_encoders_equal_eager(tiny_path, cache_dir):
    """The prompt embeddings of compiled text encoders equal eager ones within RTOL (fp32 CPU), and so do
    the latents of a whole call; each stack compiles once; a second prompt does not recompile."""
    ref_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    args = dict(prompt="a cat", prompt_2="a cat", prompt_3="a cat on a mat", device="cpu", negative_prompt="a dog")
    ref = ref_pipe.encode_prompt(**args)
    ref_latents = ref_pipe(**tiny_call(num_inference_steps=2)).images
    torch._dynamo.reset()
    pipe = sd3plugin.optimize(StableDiffusion3Pipeline.from_pretrained(tiny_path),
                              overrides=["compile_text_encoders=true", "mode=fast-compile", f"cache_dir={cache_dir}"])
    out = pipe.encode_prompt(**args)
    for r, o in zip(ref, out):
        assert _rel_err(o, r) < RTOL
    first = sd3plugin.report(pipe)["text_encoder_compilations"]
    assert first >= 1
    pipe.encode_prompt(**{**args, "prompt_3": "another prompt"})
    assert sd3plugin.report(pipe)["text_encoder_compilations"] == first
    assert _rel_err(pipe(**tiny_call(num_inference_steps=2)).images, ref_latents) < RTOL
    sd3plugin.undo(pipe)
