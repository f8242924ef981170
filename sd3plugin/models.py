"""Random-weight SD3-family pipelines, built from their published configs.

Compiled graphs do not depend on weight values, so these serve for tests, cache warm-up in CI images and
speed benchmarks. ``save_random_pipeline(arch, path)`` writes a normal diffusers folder that the real
``from_pretrained`` loads. Nothing is downloaded: tokenizers are made locally too.
"""
from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Byte-level vocabulary shared by the tiny tokenizers: every printable byte is one token.
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


@dataclass(frozen=True)
class Architecture:
    """What one preset builds: the transformer config plus text-encoder / VAE sizes."""

    name: str
    transformer: dict
    vae: dict
    clip_l: dict
    clip_g: dict
    t5: dict | None
    description: str = ""
    extra: dict = field(default_factory=dict)


_SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               projection_dim=1280, max_position_embeddings=77, hidden_act="gelu")
_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_gated_act=True,
               dense_act_fn="gelu_new")

_TINY_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                         num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                         pooled_projection_dim=64, out_channels=4, pos_embed_max_size=64)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                 norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=1.5305, shift_factor=0.0609)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=32, max_position_embeddings=77, hidden_act="gelu")
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)

ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(
        name="tiny",
        description="a few-hundred-kB SD3 pipeline for CPU tests (2 transformer blocks)",
        transformer=_TINY_TRANSFORMER,
        vae=_TINY_VAE, clip_l=_TINY_CLIP, clip_g=_TINY_CLIP, t5=_TINY_T5,
    ),
    "tiny-sd3.5": Architecture(
        name="tiny-sd3.5",
        description="the tiny pipeline with SD3.5's RMS qk-norm and MMDiT-X dual attention (CPU tests)",
        transformer=dict(_TINY_TRANSFORMER, qk_norm="rms_norm", dual_attention_layers=[0]),
        vae=_TINY_VAE, clip_l=_TINY_CLIP, clip_g=_TINY_CLIP, t5=_TINY_T5,
    ),
    "sd3-medium": Architecture(
        name="sd3-medium",
        description="stabilityai/stable-diffusion-3-medium-diffusers (2.0B transformer)",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        vae=_SD3_VAE, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
    "sd3.5-medium": Architecture(
        name="sd3.5-medium",
        description="stabilityai/stable-diffusion-3.5-medium (2.5B transformer, MMDiT-X dual attention)",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=list(range(13))),
        vae=_SD3_VAE, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
    "sd3.5-large": Architecture(
        name="sd3.5-large",
        description="stabilityai/stable-diffusion-3.5-large (8.1B transformer)",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                         qk_norm="rms_norm"),
        vae=_SD3_VAE, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    ),
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture preset {name!r}; valid presets: {', '.join(ARCHITECTURES)} "
            "(or give a Hub id / local diffusers folder as model=...)"
        ) from None


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte-to-printable-character table (as CLIP uses it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _byte_vocab() -> dict[str, int]:
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in _SPECIAL:
        vocab[tok] = len(vocab)
    return vocab


def _save_clip_tokenizer(path: Path) -> None:
    """A byte-level CLIP tokenizer with no merges: every byte is a token (the real one has 49408)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(path)


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces of the tiny T5 tokenizer: specials, the SentencePiece space marker, ASCII."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]
    return [(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)]


def _save_t5_tokenizer(path: Path, max_length: int) -> None:
    """A T5 fast tokenizer over a character-level Unigram model, written as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram(_t5_vocab(), unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(path)
    # Let from_pretrained build the class the pipeline names (T5TokenizerFast) from tokenizer.json.
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "T5TokenizerFast"
    cfg["extra_ids"] = 0
    cfg_file.write_text(json.dumps(cfg, indent=2))


def component_builders(arch: str) -> dict:
    """{component name: a function building it with random weights}, in build order (the order the random
    numbers are drawn in). Each builds on the current default device (``with torch.device(...)``)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    a = architecture(arch)
    tiny = a.name.startswith("tiny")
    bv = _byte_vocab()
    clip_vocab = len(bv) if tiny else 49408  # real vocab sizes keep the parameter counts real
    t5_vocab = len(_t5_vocab()) if tiny else 32128
    ids = dict(bos_token_id=bv[_SPECIAL[0]], eos_token_id=bv[_SPECIAL[1]], pad_token_id=bv[_SPECIAL[1]])
    return {
        "transformer": lambda: SD3Transformer2DModel(**a.transformer),
        "vae": lambda: AutoencoderKL(**a.vae),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=clip_vocab, **ids, **a.clip_l)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=clip_vocab, **ids,
                                                                             **a.clip_g)),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(vocab_size=t5_vocab, **a.t5)) if a.t5 else None,
    }


def build_random_pipeline(arch: str, dtype=None, device: str = "cpu", seed: int = 0, progress=None):
    """Build (not save) an SD3 pipeline of the given architecture with random weights.

    Each component is cast to ``dtype`` as soon as it is built, so at most one component is in float32 at
    a time. ``progress(name, module)`` is called after each component."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    builders = component_builders(arch)
    torch.manual_seed(seed)
    parts = {}
    with torch.device(device):
        for name, build in builders.items():
            module = build()
            if module is not None and dtype is not None:
                module.to(dtype)
            parts[name] = module
            if progress is not None:
                progress(name, module)
    return parts, FlowMatchEulerDiscreteScheduler(shift=3.0), StableDiffusion3Pipeline


def save_random_pipeline(arch: str, path: str | os.PathLike, dtype=None, device: str = "cpu",
                         seed: int = 0, progress=None) -> Path:
    """Write a diffusers folder of architecture ``arch`` with random weights; return its path.

    The folder is written next to ``path`` and renamed into place at the end, so an interrupted call
    never leaves a half-written pipeline behind. ``progress`` (e.g. ``sd3plugin.progress.BuildProgress``)
    hears ``built(name)`` after each component is drawn, ``writing()`` and ``written(name)`` as each is saved.
    """
    import shutil
    import tempfile

    from transformers import CLIPTokenizer, T5TokenizerFast

    a = architecture(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        parts, scheduler, pipe_cls = build_random_pipeline(
            arch, dtype=dtype, device=device, seed=seed,
            progress=(lambda name, module: progress.built(name)) if progress is not None else None)
        _save_clip_tokenizer(tmp / "_tok_clip")
        _save_t5_tokenizer(tmp / "_tok_t5", 256)
        tok = CLIPTokenizer.from_pretrained(tmp / "_tok_clip")
        tok3 = T5TokenizerFast.from_pretrained(tmp / "_tok_t5")
        pipe = pipe_cls(scheduler=scheduler, tokenizer=tok, tokenizer_2=tok, tokenizer_3=tok3, **parts)
        if progress is not None:
            progress.writing()
        with _saves_reported(parts, progress.written if progress is not None else None):
            pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        (tmp / "pipe" / "sd3plugin_arch.json").write_text(
            json.dumps({"arch": a.name, "random_weights": True, "seed": seed}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp / "pipe", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextmanager
def _saves_reported(parts: dict, written):
    """Call ``written(name)`` after each component's own ``save_pretrained`` (the pipeline's save calls them
    one by one); the wrapper keeps the method's signature, which diffusers inspects."""
    patched = []
    for name, module in parts.items() if written is not None else ():
        if module is None:
            continue
        original = module.save_pretrained

        @functools.wraps(original)
        def save(*args, _name=name, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            written(_name)
            return result

        module.save_pretrained = save
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.save_pretrained


def _local_configs(model: str) -> tuple[dict, dict] | None:
    folder = Path(model).expanduser()
    try:
        t = json.loads((folder / "transformer" / "config.json").read_text())
        v = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return t, v


def resolution_rule(model: str) -> tuple[int, int] | None:
    """(multiple, maximum) in pixels for height/width, from the preset or local folder's configs."""
    if model in ARCHITECTURES:
        a = ARCHITECTURES[model]
        t, v = a.transformer, a.vae
    else:
        found = _local_configs(model)
        if found is None:
            return None
        t, v = found
    scale = 2 ** (len(v.get("block_out_channels", [0] * 4)) - 1)
    multiple = scale * t.get("patch_size", 2)
    return multiple, t.get("pos_embed_max_size", 96) * multiple


def default_resolution(model: str) -> int:
    """The model's native square resolution in pixels (sample_size x VAE scale)."""
    if model in ARCHITECTURES:
        a = ARCHITECTURES[model]
        t, v = a.transformer, a.vae
    else:
        found = _local_configs(model)
        if found is None:
            return 1024
        t, v = found
    return t.get("sample_size", 128) * 2 ** (len(v.get("block_out_channels", [0] * 4)) - 1)


def _presets_taking(size: int) -> str:
    """``, or model=sd3-medium (up to 3072)``: the first full-size preset that takes ``size`` pixels."""
    for name in ARCHITECTURES:
        multiple, maximum = resolution_rule(name)
        if not name.startswith("tiny") and size % multiple == 0 and size <= maximum:
            return f", or model={name} (up to {maximum})"
    return ""


def check_resolution(model: str, height: int | None, width: int | None) -> None:
    rule = resolution_rule(model)
    if rule is None:  # Hub id not in the local cache: diffusers checks at call time
        rule = (16, None)
    multiple, maximum = rule
    for key, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if value % multiple:
            lo = value // multiple * multiple
            raise ConfigError(f"{key}={value} is not a multiple of {multiple} (VAE scale x patch size) for "
                              f"model={model!r}; use {lo or multiple} or {lo + multiple}")
        if maximum and value > maximum:
            raise ConfigError(f"{key}={value} is larger than model={model!r} can take "
                              f"(pos_embed_max_size allows at most {maximum}); use {maximum} or less"
                              + _presets_taking(value))
