"""``fp8_fused_activation``: SD3's transformer blocks with their fp8 activations quantized by the kernel that
produces them (``fp8_activation``), fed straight to the fp8 matmuls.

With ``quant=fp8_e4m3_e4m3_dynamic`` every quantized linear layer quantizes its input per row at each call
(torchao: ``amax``, divide, clamp, cast: passes over an activation that another pass has just written).
Here a block's forward (``fused_forward``, installed on each ``JointTransformerBlock`` instance) computes:

- ``norm1`` (AdaLayerNormZero's LayerNorm + ``* (1 + scale_msa) + shift_msa``) as e4m3 rows + per-row scales
  (``Fp8Rows``) for the attention's Q/K/V projection (``to_qkv``, or ``to_q``/``to_k``/``to_v``);
- the same for ``norm1_context`` when the text stream's projections are quantized (not by default);
- ``norm2`` + the feed-forward's modulation for ``ff.net.0.proj``, then that matmul's output through
  tanh-GELU + quantization for ``ff.net.2`` (and the same for ``ff_context`` where quantized);
- each of those matmuls as ``torch._scaled_mm`` on the e4m3 rows and torchao's own e4m3 weight and per-row
  scales (``compat.torchao``), with torchao's ``use_fast_accum`` and bias: the call torchao makes itself.

A consumer whose weight is not torchao's per-row fp8 (a layer left out of the selection, a text-stream
layer by default) gets the 16-bit activation exactly as diffusers computes it. Blocks with SD3.5's second
attention (``use_dual_attention``) keep diffusers' forward. The e4m3 weights are referenced as buffers of
their linear layers (``W8``/``WS``; the same storage, not a copy) so that compiled graphs take them as
inputs. ``install`` returns the undo.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..compat import torch as tcompat
from ..compat import torchao as aocompat
from . import fp8_activation  # noqa: F401  (registers the sd3plugin::fp8_* ops)

W8, WS, FAST = "_sd3plugin_fp8_w8", "_sd3plugin_fp8_ws", "_sd3plugin_fp8_fast_accum"
BLOCK_FLAG = "_sd3plugin_fp8_fused"


class Fp8Rows(NamedTuple):
    """An activation of ``shape`` (B, S, D) in ``dtype``, held as (B*S, D) e4m3 rows and (B*S, 1) scales."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple
    dtype: torch.dtype


def takes_fp8(linear) -> bool:
    """Whether ``linear`` runs on ``Fp8Rows`` (its torchao per-row fp8 weight is referenced)."""
    return linear is not None and getattr(linear, W8, None) is not None


def linear(module, x):
    """``module(x)`` for a 16-bit ``x``; the fp8 matmul for ``Fp8Rows`` (``module`` must take them)."""
    if not isinstance(x, Fp8Rows):
        return module(x)
    w8, ws = getattr(module, W8), getattr(module, WS)
    out = tcompat.scaled_mm(x.q, w8.t(), x.scale, ws.t(), module.bias, x.dtype, getattr(module, FAST))
    return out.view(*x.shape[:-1], w8.shape[0])


def _modulated(norm, x, shift, scale, consumers):
    """``norm(x) * (1 + scale) + shift`` (diffusers' formulation) or, when every consumer takes fp8, the same
    quantized in one kernel."""
    if all(takes_fp8(c) for c in consumers):
        q, s = torch.ops.sd3plugin.fp8_norm_modulate_quantize(x, shift, scale, float(norm.eps))
        return Fp8Rows(q, s, tuple(x.shape), x.dtype)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _qkv_consumers(attn, context: bool) -> list:
    from .attention import uses_fused

    if uses_fused(attn):
        return [attn.to_added_qkv if context else attn.to_qkv]
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    return [getattr(attn, n, None) for n in names]


def feed_forward(ff, x):
    """diffusers' FeedForward (tanh-GELU, dropout, linear) on a 16-bit ``x`` or on ``Fp8Rows``."""
    if not isinstance(x, Fp8Rows):
        return ff(x)
    proj, out_linear = ff.net[0].proj, ff.net[2]
    h = linear(proj, x)
    if takes_fp8(out_linear):
        q, s = torch.ops.sd3plugin.fp8_gelu_quantize(h.reshape(-1, h.shape[-1]))
        return linear(out_linear, Fp8Rows(q, s, tuple(h.shape), h.dtype))
    return out_linear(F.gelu(h, approximate="tanh"))


def fused_forward(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """``JointTransformerBlock.forward`` (diffusers 0.32 - 0.42, without dual attention or feed-forward
    chunking) with the fp8 activations quantized by their producers."""
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn = block.attn
    n1 = block.norm1
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = n1.linear(n1.silu(temb)).chunk(6, dim=1)
    norm_hidden_states = _modulated(n1.norm, hidden_states, shift_msa, scale_msa, _qkv_consumers(attn, False))
    if block.context_pre_only:
        norm_encoder_hidden_states = block.norm1_context(encoder_hidden_states, temb)
    else:
        c1 = block.norm1_context
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            c1.linear(c1.silu(temb)).chunk(6, dim=1)
        norm_encoder_hidden_states = _modulated(c1.norm, encoder_hidden_states, c_shift_msa, c_scale_msa,
                                                _qkv_consumers(attn, True))
    attn_output, context_attn_output = attn(hidden_states=norm_hidden_states,
                                            encoder_hidden_states=norm_encoder_hidden_states,
                                            **joint_attention_kwargs)
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    ff_in = _modulated(block.norm2, hidden_states, shift_mlp, scale_mlp, [_ff_proj(block.ff)])
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * feed_forward(block.ff, ff_in)
    if block.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    ctx_in = _modulated(block.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                        [_ff_proj(block.ff_context)])
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * feed_forward(block.ff_context, ctx_in)
    return encoder_hidden_states, hidden_states


def _ff_proj(ff):
    return ff.net[0].proj if _plain_ff(ff) else None


def _plain_ff(ff) -> bool:
    """diffusers' ``FeedForward(activation_fn="gelu-approximate")``: GELU(proj, tanh), Dropout, Linear."""
    net = getattr(ff, "net", None)
    return (net is not None and len(net) == 3 and type(net[0]).__name__ == "GELU"
            and getattr(net[0], "approximate", None) == "tanh" and isinstance(net[1], torch.nn.Dropout)
            and type(net[2]) is torch.nn.Linear and type(getattr(net[0], "proj", None)) is torch.nn.Linear)


def _plain_norm(norm, ada: bool) -> bool:
    ln = norm.norm if ada else norm
    ok = type(ln) is torch.nn.LayerNorm and not ln.elementwise_affine and len(ln.normalized_shape) == 1
    return ok and (not ada or (type(norm).__name__ == "AdaLayerNormZero" and getattr(norm, "emb", None) is None))


def block_applies(block) -> str | None:
    """Why ``block`` keeps diffusers' forward (None: it can run ``fused_forward``)."""
    if type(block).__name__ != "JointTransformerBlock":
        return f"not a JointTransformerBlock ({type(block).__name__})"
    if getattr(block, "use_dual_attention", False):
        return "SD3.5's second attention (use_dual_attention)"
    if getattr(block, "_chunk_size", None) is not None:
        return "feed-forward chunking is on"
    if not _plain_norm(block.norm1, True) or not _plain_norm(block.norm2, False):
        return "its norms are not AdaLayerNormZero / LayerNorm without affine"
    if not block.context_pre_only and not (_plain_norm(block.norm1_context, True)
                                           and _plain_norm(block.norm2_context, False)):
        return "its context norms are not AdaLayerNormZero / LayerNorm without affine"
    if not _plain_ff(block.ff):
        return "its feed-forward is not diffusers' tanh-GELU FeedForward"
    return None


def _consumers(block) -> list:
    """The linear layers whose input a producer of ``block`` can quantize."""
    attn = block.attn
    out = [getattr(attn, n, None) for n in ("to_qkv", "to_q", "to_k", "to_v", "to_added_qkv",
                                            "add_q_proj", "add_k_proj", "add_v_proj")]
    out += [block.ff.net[0].proj, block.ff.net[2]]
    if not block.context_pre_only and _plain_ff(block.ff_context):
        out += [block.ff_context.net[0].proj, block.ff_context.net[2]]
    return [m for m in out if type(m) is torch.nn.Linear]


class Installed:
    """What ``install`` did: the blocks now running ``fused_forward``, the linear layers taking fp8 rows,
    the blocks left alone and why; ``undo()`` removes it all."""

    def __init__(self):
        self.blocks, self.linears, self.skipped = [], [], {}

    def __call__(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
            block.__dict__.pop(BLOCK_FLAG, None)
        for mod in self.linears:
            for name in (W8, WS):
                mod._buffers.pop(name, None)
            mod.__dict__.pop(FAST, None)
        self.blocks, self.linears = [], []


def install(transformer) -> Installed:
    """Run every eligible block of ``transformer`` with its fp8 activations fused into their producers."""
    done = Installed()
    try:
        for i, block in enumerate(transformer.transformer_blocks):
            why = block_applies(block)
            taking = []
            if why is None:
                for mod in _consumers(block):
                    w = aocompat.rowwise_fp8_weight(mod.weight)
                    if w is not None:
                        taking.append((mod, w))
                if not taking:
                    why = "none of its linear layers has torchao's per-row fp8 weight"
            if why is not None:
                done.skipped[f"transformer_blocks.{i}"] = why
                continue
            for mod, w in taking:
                mod.register_buffer(W8, w.qdata, persistent=False)
                mod.register_buffer(WS, w.scale, persistent=False)
                setattr(mod, FAST, w.fast_accum)
                done.linears.append(mod)
            block.forward = fused_forward.__get__(block)
            setattr(block, BLOCK_FLAG, True)
            done.blocks.append(block)
    except BaseException:
        done()
        raise
    return done
