"""CUDA graphs of the whole transformer step, around a regionally compiled transformer.

Inductor's own CUDA graph trees (``triton.cudagraphs``) break on regional compilation of SD3: the 24
blocks share one compiled graph and a block's output is read after the next replay overwrote it
("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", H100, torch 2.11).
``CudaGraphForward`` instead captures one graph of the whole ``transformer(...)`` call per input
signature (shapes, dtypes, non-tensor arguments), after ``warmup`` plain calls (compilation and
autotuning happen there), copies new inputs into the graph's static buffers and replays it. All graphs
share one memory pool. Anything it cannot capture runs as a plain call, with one warning.

A graph replays the parameters it was captured with. Before each replay the runner checks that every
parameter is still the same tensor at the same address (``pipe.to(...)``, offload, ``lora`` layers or an
assigned weight would change that) and drops its graphs when not; ``suspend(reason)`` turns replay off while
something the graphs would bake in can change between calls (LoRA adapters, whose ``set_adapters`` weights
are Python numbers; model offload).
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch
from torch.utils import _pytree as pytree

from ..compat import torch as tcompat

log = logging.getLogger("sd3plugin")


class CudaGraphForward:
    """Installed as ``module._compiled_call_impl``: ``module(...)`` replays a captured graph when it can."""

    def __init__(self, module: torch.nn.Module, warmup: int = 2, max_graphs: int = 16):
        self.module, self.warmup, self.max_graphs = module, warmup, max_graphs
        self.graphs: dict = {}
        self.calls: Counter = Counter()
        self.failed: set = set()
        self.pool = None
        self.replays = 0
        self.params: list = []          # (owner module, name, tensor, address) at capture
        self.suspended: str | None = None
        self.invalidated = 0
        self.before = None  # called first at every call (the transformer's guard: weights in sync, LoRA state)
        self.capture_seconds = 0.0      # spent capturing graphs (warm-up on the side stream included)

    def suspend(self, reason: str | None) -> None:
        """Run plain calls (``reason``) or, with None, replay again."""
        if reason and not self.suspended:
            self.drop()
        self.suspended = reason

    def drop(self) -> None:
        if self.graphs:
            self.invalidated += 1
        self.graphs.clear()
        self.calls.clear()
        self.params = []
        self.pool = None

    def _record_params(self) -> list:
        out = []
        for mod in self.module.modules():
            for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is not None:
                    out.append((mod, name, t, t.data_ptr()))
        return out

    def _params_unchanged(self) -> bool:
        for mod, name, t, ptr in self.params:
            current = mod._parameters.get(name)
            if current is None:
                current = mod._buffers.get(name)
            if current is not t or t.data_ptr() != ptr:
                return False
        return True

    def _plain(self, args, kwargs):
        return tcompat.plain_call(self.module, *args, **kwargs)

    @staticmethod
    def _signature(leaves, spec):
        key = [str(spec)]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device.type != "cuda" or leaf.requires_grad:
                    return None
                key.append(("T", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device.index))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                key.append(("V", type(leaf).__name__, leaf))
            else:
                return None
        return tuple(key)

    def __call__(self, *args, **kwargs):
        if self.before is not None:
            self.before()
        if torch.is_grad_enabled() or self.suspended:  # autograd (no gradients in graphs), LoRA, offload
            return self._plain(args, kwargs)
        if self.graphs and not self._params_unchanged():
            self.drop()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._signature(leaves, spec)  # None unless every tensor is on a CUDA device
        if key is None or key in self.failed or torch.cuda.is_current_stream_capturing():
            return self._plain(args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            self.calls[key] += 1
            if self.calls[key] <= self.warmup or len(self.graphs) >= self.max_graphs:
                return self._plain(args, kwargs)
            if not self.graphs:
                self.params = self._record_params()
            entry = self._capture(key, leaves, spec)
            if entry is None:
                return self._plain(args, kwargs)
        graph, static_leaves, static_out = entry
        for dst, src in zip(static_leaves, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(self, key, leaves, spec):
        started = time.perf_counter()
        try:
            return self._capture_timed(key, leaves, spec)
        finally:
            self.capture_seconds += time.perf_counter() - started

    def _capture_timed(self, key, leaves, spec):
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._plain(args, kwargs)  # warm-up on a side stream, as capture needs
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self._plain(args, kwargs)
            self.pool = graph.pool()
        except Exception as exc:  # uncapturable op, sync inside the forward, out of memory...
            self.failed.add(key)
            log.warning("sd3plugin: CUDA graph capture failed (%s: %s); this shape runs without CUDA graphs",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return None
        entry = (graph, static_leaves, static_out)
        self.graphs[key] = entry
        return entry

    def info(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "failed_signatures": len(self.failed),
                "invalidated": self.invalidated, "suspended": self.suspended,
                "capture_seconds": round(self.capture_seconds, 3)}


def install(module: torch.nn.Module, **kwargs) -> CudaGraphForward:
    runner = CudaGraphForward(module, **kwargs)
    tcompat.set_compiled_call(module, runner)
    return runner


def runner_of(module: torch.nn.Module) -> CudaGraphForward | None:
    runner = tcompat.compiled_call(module)
    return runner if isinstance(runner, CudaGraphForward) else None


def uninstall(module: torch.nn.Module) -> None:
    if runner_of(module) is not None:
        tcompat.clear_compiled_call(module)
