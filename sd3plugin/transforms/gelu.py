"""GELU in the matmul epilogue (``fuse_gelu=true``, CUDA + inductor), after quantizing: plain weights only."""
from __future__ import annotations

from ..kernels import gelu_epilogue
from .base import Handle, Run

NAME = "fuse_gelu"


def apply(run: Run) -> Handle | None:
    plan = run.plan
    if not (plan.fuse_gelu and run.backend.name == "inductor" and plan.device == "cuda"):
        return None
    undo = gelu_epilogue.fuse_gelu(run.transformer)
    run.report["fused_gelu"] = undo.fused
    return Handle(NAME, undo, {})
