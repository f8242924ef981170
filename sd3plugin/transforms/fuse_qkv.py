"""Fused Q/K/V projections (``fuse_qkv=true``): one matmul for each attention's Q, K and V.

Each attention gets ``to_qkv`` (and ``to_added_qkv`` for the context) whose weight holds the three
projections stacked; ``to_q``/``to_k``/``to_v`` become views of it, so fusing costs no memory and an in-place
change of one projection (``fuse_lora``, ``load_state_dict``) changes the fused weight with it.

What diffusers does to the transformer later must never be lost on the fused path. Before every forward,
``FusedProjections.sync()`` checks each fused attention:
- a projection that is no longer a plain ``nn.Linear`` (PEFT wrapped it: ``load_lora_weights``) -> that
  attention runs its separate projections, so the LoRA, ``set_adapters`` weights, ``fuse_lora`` and
  ``delete_adapters`` all act exactly as in diffusers;
- a projection whose weight is no longer a view of the fused weight (``pipe.to(...)``, model offload, a
  LoRA fused and then unloaded with ``safe_fusing``) -> the fused weight is rebuilt from the projections;
  with a quantized fused weight, which cannot be rebuilt, that attention runs its separate projections.
``_sd3plugin_fused`` on the attention module tells the processor which path to take.
``undo()`` removes the fused modules and gives each projection its own storage again, so the state dict is
the one diffusers had (keys and values) and ``save_pretrained`` works. While fused, the state dict leaves the
fused modules out.
"""
from __future__ import annotations

import torch

from ..kernels.attention import FUSED_FLAG as FLAG
from ..compat import diffusers as dcompat
from .base import Handle, Run

NAME = "fuse_qkv"
GROUPS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


def _shares_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is a slice of a bigger storage (a view of a fused weight)."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def _plain_weights(lin) -> bool:
    return dcompat.is_plain_linear(lin) and type(lin.weight.data) is torch.Tensor


def _fusable(attn) -> bool:
    if getattr(attn, "to_qkv", None) is not None or getattr(attn, "is_cross_attention", False):
        return False
    groups = [parts for _, parts in GROUPS if getattr(attn, parts[0], None) is not None]
    return all(_plain_weights(getattr(attn, n)) for parts in groups for n in parts)


def _stack(parts: list, fused: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Stack ``parts`` into ``fused`` (a new Linear when None) and make the parts views of it."""
    grad = parts[0].weight.requires_grad
    w = torch.cat([p.weight.detach() for p in parts])
    b = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    if fused is None:  # built on the meta device: no random init of a big matrix
        fused = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
        fused.weight = torch.nn.Parameter(w, requires_grad=grad)
        if b is not None:
            fused.bias = torch.nn.Parameter(b, requires_grad=grad)
    else:
        fused.weight.data = w
        if b is not None:
            fused.bias.data = b
    start = 0
    for lin in parts:
        n = lin.weight.shape[0]
        lin.weight.data = fused.weight.data[start:start + n]
        if b is not None:
            lin.bias.data = fused.bias.data[start:start + n]
        start += n
    return fused


def _own_storage(lin) -> None:
    """Give a projection its own storage again (it was a view of a fused weight)."""
    for name in ("weight", "bias"):
        p = getattr(lin, name, None)
        if p is not None and type(p.data) is torch.Tensor and _shares_storage(p.data):
            p.data = p.data.clone()


def _views_of(parts: list, fused) -> bool:
    """Whether every part's weight and bias still sit in ``fused``'s storage, where ``_stack`` put them."""
    w, b = fused.weight, fused.bias
    if type(w.data) is not torch.Tensor:
        return False
    step = w.element_size() * w.shape[1]
    offset = 0
    for lin in parts:
        n = lin.weight.shape[0]
        if lin.weight.data_ptr() != w.data_ptr() + offset * step or lin.weight.dtype != w.dtype:
            return False
        if b is not None and (lin.bias is None or lin.bias.data_ptr() != b.data_ptr() + offset * b.element_size()):
            return False
        offset += n
    return True


class _Fused:
    """One attention's fused groups and what was fused."""

    def __init__(self, name: str, attn):
        self.name, self.attn = name, attn
        self.groups = [(fused, parts) for fused, parts in GROUPS if getattr(attn, parts[0], None) is not None]
        self.frozen = {}  # quantized fused weights: the weight objects of the parts they were built from

    def fuse(self) -> None:
        for fused, parts in self.groups:
            setattr(self.attn, fused, _stack([getattr(self.attn, n) for n in parts]))
        setattr(self.attn, FLAG, True)

    def sync(self) -> str:
        """Make the fused path exact or switch it off; return 'fused', 'rebuilt', 'separate' or 'frozen'."""
        attn = self.attn
        parts_of = [[getattr(attn, n) for n in parts] for _, parts in self.groups]
        if not all(dcompat.is_plain_linear(p) for parts in parts_of for p in parts):
            setattr(attn, FLAG, False)  # PEFT layers (LoRA): the separate projections run them
            return "separate"
        state = "fused"
        for (fused_name, _), parts in zip(self.groups, parts_of):
            fused = getattr(attn, fused_name)
            if type(fused.weight.data) is not torch.Tensor:  # quantized: cannot restack
                key = tuple((id(p.weight), _address(p.weight)) for p in parts)
                if self.frozen.setdefault(fused_name, key) != key:
                    setattr(attn, FLAG, False)
                    return "frozen"
                continue
            if not _views_of(parts, fused):
                _stack(parts, fused)
                state = "rebuilt"
        setattr(attn, FLAG, True)
        return state

    def unfuse(self) -> None:
        for fused_name, parts in self.groups:
            for n in parts:
                _own_storage(getattr(self.attn, n))
            if fused_name in self.attn._modules:
                del self.attn._modules[fused_name]
        self.attn.__dict__.pop(FLAG, None)
        self.attn.fused_projections = False


def _address(t) -> int:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage (quantized)
        return 0


class FusedProjections:
    """The fused attentions of one transformer; ``sync()`` before each forward keeps them exact.

    The full check runs only when something changed since the last one: the fast path compares every
    projection module and parameter object, and each parameter's address, with what the last check saw
    (about 300 lookups for SD3-medium)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.items: list[_Fused] = []
        self.counts = {"fused": 0, "rebuilt": 0, "separate": 0, "frozen": 0}
        self.rebuilt = 0  # fused weights rebuilt since fusing (moves, dtype changes)
        self._hook = None
        self._modules: list = []  # (attention's _modules, name, module) as the last full check saw them
        self._params: list = []   # (module's _parameters, name, parameter, address)

    def _remember(self) -> None:
        mods, params = [], []
        for item in self.items:
            for fused_name, parts in item.groups:
                for n in (fused_name, *parts):
                    lin = item.attn._modules.get(n)
                    mods.append((item.attn._modules, n, lin))
                    for pn, p in getattr(lin, "_parameters", {}).items():
                        if p is not None:
                            params.append((lin._parameters, pn, p, _address(p)))
        self._modules, self._params = mods, params

    def unchanged(self) -> bool:
        for d, n, m in self._modules:
            if d.get(n) is not m:
                return False
        for d, n, p, ptr in self._params:
            if d.get(n) is not p or _address(p) != ptr:
                return False
        return bool(self._modules)

    def fuse(self) -> int:
        for name, attn in dcompat.attention_modules(self.transformer):
            if _fusable(attn):
                item = _Fused(name, attn)
                item.fuse()
                attn.fused_projections = True
                self.items.append(item)
        if self.items:
            self._hook = self.transformer._register_state_dict_hook(_drop_fused_keys)
        return len(self.items)

    def sync(self) -> dict:
        if self.unchanged():
            self.counts = {**self.counts, "rebuilt": 0}
            return {**self.counts, "rebuilt_total": self.rebuilt}
        counts = {"fused": 0, "rebuilt": 0, "separate": 0, "frozen": 0}
        for item in self.items:
            counts[item.sync()] += 1
        self.rebuilt += counts["rebuilt"]
        self.counts = counts
        self._remember()
        return {**counts, "rebuilt_total": self.rebuilt}

    def unfuse(self) -> None:
        for item in self.items:
            item.unfuse()
        self.items.clear()
        self._modules, self._params = [], []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _drop_fused_keys(module, state_dict, prefix, local_metadata):
    """The state dict of a fused transformer is diffusers' own: no fused keys, no shared storage."""
    for key in [k for k in state_dict if k.rsplit(".", 2)[-2] in ("to_qkv", "to_added_qkv")]:
        del state_dict[key]
    for key, value in state_dict.items():
        if type(value) is torch.Tensor and _shares_storage(value):
            state_dict[key] = value.clone()
    return state_dict


def apply(run: Run) -> Handle | None:
    if not (run.plan.fuse_qkv and run.compiling):
        return None
    fp = FusedProjections(run.transformer)
    n = fp.fuse()
    run.report["fused_qkv"] = n > 0
    run.fused = fp
    return Handle(NAME, fp.unfuse, {"fused_qkv_modules": n})
