"""The inductor backend: regional torch.compile of the repeated JointTransformerBlocks.

Compiling the 24 identical blocks instead of the whole model gives the same speed with one graph that
all blocks share (13-18 s instead of 79 s on an H100). Where the cache entry holds precompiled blocks for
this machine, the blocks run those instead and nothing is traced (``precompiled.py``). ``nn.Module.compile`` works in place, so the state
dict keys stay as they are and ``undo`` restores the module exactly.
"""
from __future__ import annotations

import torch

from ..compat import torch as tcompat
from ..config.modes import inductor_options
from . import cudagraph, precompiled, register_backend
from .base import Backend, CompilePlan, transformer_blocks

MIN_TORCH = (2, 3)


def _torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


@register_backend("inductor")
class InductorBackend(Backend):
    def availability(self, plan: CompilePlan) -> tuple[bool, str]:
        if _torch_version() < MIN_TORCH:
            return False, f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"
        return True, f"torch {torch.__version__}"

    def options(self, plan: CompilePlan) -> dict:
        opts = {**inductor_options(plan.tokens, plan.device), **plan.options}
        # The cudagraphs token captures the whole transformer step (cudagraph.py) instead of inductor's
        # per-graph CUDA graph trees, which break on regionally compiled blocks.
        opts.pop("triton.cudagraphs", None)
        return opts

    def whole_step_graphs(self, plan: CompilePlan) -> bool:
        return plan.device == "cuda" and "cudagraphs" in plan.tokens and \
            not plan.options.get("triton.cudagraphs", False)

    def compile(self, transformer, plan: CompilePlan) -> dict:
        opts = self.options(plan)
        if plan.options.get("triton.cudagraphs"):
            opts["triton.cudagraphs"] = True  # asked for explicitly in backend_options: inductor's own
        names = []
        blocks = transformer_blocks(transformer)
        for i, block in enumerate(blocks):
            block.compile(backend="inductor", options=dict(opts), dynamic=True if plan.dynamic else False)
            names.append(f"transformer_blocks.{i}")
        # Precompiled artefacts of these blocks (warm built them): run without tracing where they match.
        artefacts, pre = precompiled.load(plan, transformer)
        precompiled.install(transformer, blocks, artefacts, pre)
        info = {"compiled_modules": names, "inductor_options": opts, "strategy": "regional", "precompiled": pre}
        if self.whole_step_graphs(plan):
            cudagraph.install(transformer)
            info["cuda_graphs"] = "whole transformer step, one graph per input shape"
        return info

    def undo(self, transformer) -> None:
        cudagraph.uninstall(transformer)
        for block in transformer_blocks(transformer):
            tcompat.clear_compiled_call(block)
