"""Precompiled transformer blocks: a warm start whose first call neither traces nor compiles.

``warm`` runs the pipeline with the blocks compiled as usual while ``recording()`` keeps the inputs of the
first call of each distinct block (structure, input shapes and dtypes, grad mode); then ``build()``
precompiles ``type(block).forward`` for those inputs (``sd3plugin.compat.precompile``: Dynamo's AOT
compile, inductor with the backend's options; the FX-graph cache the calls just filled makes it quick) and
``sd3plugin.cache.precompiled`` stores the artefacts in the cache entry, so ``pack`` / ``install`` carry
them. With static shapes there is one artefact per block structure (SD3's last block differs) and
resolution; with ``dynamic=true`` one per structure serves the warmed range.

``optimize()`` (the inductor backend) ``load()``s the artefacts of the plan's fingerprint when they match
this machine and installs ``PrecompiledBlock`` on every block: a call runs the first artefact whose guards
accept it (the module passes itself as ``self``: the 24 blocks share the artefacts), else the block's
ordinary ``torch.compile`` call (Dynamo traces, the inductor cache serves), counted as a miss with its reason
in ``report(pipe)["precompiled"]``. Nothing here raises: an artefact that cannot be read, loaded or run is
reported and the ordinary path runs; ``warm`` rebuilds it.
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager

import torch

from ..compat import precompile as pc
from ..compat import torch as tcompat

log = logging.getLogger("sd3plugin")
_RECORDING: dict | None = None  # {"keys": set, "samples": list} while warm records block inputs


@contextmanager
def recording():
    """Inside the block, compiled blocks keep the inputs of their first call per distinct signature (for
    ``build``) and precompiled artefacts are not loaded (warm compiles for real: its caches need it)."""
    global _RECORDING
    state = {"keys": set(), "samples": []}
    _RECORDING = state
    try:
        yield state["samples"]
    finally:
        _RECORDING = None


def structure_key(block) -> str:
    """What Dynamo specializes a block on besides its inputs: its modules' names and classes, processors."""
    parts = [f"{name}:{type(m).__qualname__}:{type(getattr(m, 'processor', None)).__qualname__}"
             for name, m in block.named_modules()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _describe(value):
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype).replace("torch.", ""), value.device.type]
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def input_key(structure: str, args: tuple, kwargs: dict) -> tuple[str, dict]:
    described = {"args": _describe(args), "kwargs": _describe(kwargs), "grad": torch.is_grad_enabled()}
    text = repr((structure, described))
    return hashlib.sha256(text.encode()).hexdigest()[:16], described


class PrecompiledBlock:
    """Installed as ``block._compiled_call_impl`` over the block's ordinary compiled call (``fallback``)."""

    def __init__(self, block, fallback, artefacts: list, stats: dict):
        self.block, self.fallback, self.artefacts, self.stats = block, fallback, artefacts, stats
        self.structure = structure_key(block)

    def __call__(self, *args, **kwargs):
        if self.artefacts:
            if tcompat.has_forward_hooks(self.block):
                self._miss("the block has forward hooks (the precompiled forward would skip them)")
            else:
                full = (self.block, *args)
                for art in self.artefacts:
                    if pc.guard_check(art, full, kwargs):
                        return self._run(art, full, args, kwargs)
                self._miss(f"no precompiled block accepts this call ({pc.guard_failure(self.artefacts[0], full, kwargs)})")
        if _RECORDING is not None:
            self._record(args, kwargs)
        return self.fallback(*args, **kwargs)

    def _run(self, art, full, args, kwargs):
        try:
            out = pc.call(art, full, kwargs)
        except Exception as exc:  # an artefact that cannot run here: never again in this process
            self.artefacts.clear()
            self.stats["used"] = False
            self.stats["reason"] = f"a precompiled block failed at its call ({type(exc).__name__}: {str(exc)[:200]}); " \
                                   "the blocks are compiled by Dynamo instead"
            log.warning("sd3plugin: %s", self.stats["reason"])
            return self.fallback(*args, **kwargs)
        self.stats["hits"] = self.stats.get("hits", 0) + 1
        return out

    def _miss(self, reason: str) -> None:
        self.stats["misses"] = self.stats.get("misses", 0) + 1
        if not self.stats.get("miss_reason"):
            self.stats["miss_reason"] = reason
            log.warning("sd3plugin: %s; Dynamo compiles this call (warm this shape to precompile it)", reason)

    def _record(self, args, kwargs) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        key, described = input_key(self.structure, args, kwargs)
        if key in _RECORDING["keys"]:
            return
        _RECORDING["keys"].add(key)
        _RECORDING["samples"].append({"block": self.block, "args": args, "kwargs": dict(kwargs), "key": key,
                                      "inputs": described, "grad": torch.is_grad_enabled(), "structure": self.structure,
                                      "block_class": type(self.block).__qualname__})


def install(transformer, blocks: list, artefacts: list, stats: dict) -> None:
    """Wrap each block's ordinary compiled call (set by ``nn.Module.compile``) in a ``PrecompiledBlock``."""
    for block in blocks:
        fallback = tcompat.compiled_call(block)
        if fallback is not None and not isinstance(fallback, PrecompiledBlock):
            tcompat.set_compiled_call(block, PrecompiledBlock(block, fallback, artefacts, stats))


def fingerprint_for(plan, transformer) -> str | None:
    """The cache fingerprint of the plan's config for this transformer's architecture."""
    from ..cache.manifest import ARCH_KEYS, fingerprint

    if plan.cfg is None:
        return None
    config = getattr(transformer, "config", {})
    arch = {k: config.get(k) for k in ARCH_KEYS}
    arch["dual_attention_layers"] = list(arch["dual_attention_layers"] or [])
    return fingerprint(plan.cfg, arch=arch)


def load(plan, transformer) -> tuple[list, dict]:
    """The precompiled blocks this plan may use here, and ``report(pipe)["precompiled"]``."""
    info = {"used": False, "reason": None, "artefacts": 0, "hits": 0, "misses": 0, "load_seconds": 0.0}
    if not plan.precompiled:
        info["reason"] = "precompiled=false (SD3PLUGIN_PRECOMPILED=0)"
        return [], info
    if _RECORDING is not None:
        info["reason"] = "warm compiles the blocks itself and builds the precompiled blocks from them"
        return [], info
    ok, why = pc.support()
    if not ok:
        info["reason"] = why
        return [], info
    from ..cache import precompiled as store
    from ..cache.manifest import environment

    started = time.perf_counter()
    fp = fingerprint_for(plan, transformer)
    info["fingerprint"] = fp
    records, problems, why = store.usable(plan.cache_dir, fp, environment()) if fp else ([], [], "no config")
    loaded = []
    for record, data in records:
        try:
            art = pc.deserialize(data)
        except Exception as exc:
            problems.append({"file": record["file"], "reason": f"cannot load it: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        changed = pc.source_changes(art)
        if changed:
            problems.append({"file": record["file"], "reason": "the source of traced code changed: " + ", ".join(changed[:3])})
            continue
        loaded.append(art)
    info["load_seconds"] = round(time.perf_counter() - started, 3)
    info["artefacts"] = len(loaded)
    if problems:
        info["problems"] = problems
        for p in problems:
            log.warning("sd3plugin: precompiled block %s not used: %s (the next `sd3plugin-cache warm` rebuilds it)",
                        p["file"], p["reason"])
    if loaded:
        info["used"] = True
    else:
        info["reason"] = "; ".join(f"{p['file']}: {p['reason']}" for p in problems) if problems else why
        log.info("sd3plugin: no precompiled blocks (%s); Dynamo traces the blocks at the first call", info["reason"])
    return loaded, info


def build(samples: list, options: dict, dynamic: bool, keep_keys: set) -> tuple[list, list[str]]:
    """Precompile the recorded block calls not covered yet: ([(record, bytes)], [errors])."""
    built, errors = [], []
    for s in samples:
        if s["key"] in keep_keys:
            continue
        full = (s["block"], *s["args"])
        with torch.set_grad_enabled(s["grad"]):
            if any(pc.guard_check(c, full, s["kwargs"]) for _, _, c in built):
                continue  # dynamic shapes: one artefact covers this call too
            try:
                compiled = pc.compile_function(type(s["block"]).forward, full, s["kwargs"], options, dynamic)
                data = pc.serialize(compiled)
            except Exception as exc:
                errors.append(f"{s['block_class']} {s['inputs']['kwargs']}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
        record = {"kind": "transformer_block", "block_class": s["block_class"], "structure": s["structure"], "key": s["key"],
                  "inputs": s["inputs"], "dynamic": bool(dynamic), "api": pc.api()}
        built.append((record, data, compiled))
    return [(r, d) for r, d, _ in built], errors
