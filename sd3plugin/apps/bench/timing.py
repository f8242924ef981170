"""Timing of pipeline calls: per-step events, whole timed calls, and Dynamo's graph count."""
from __future__ import annotations

import time

import torch


class StepEvents:
    """``callback_on_step_end`` recording a CUDA event (or a host clock on CPU) after every step."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list = []

    def mark(self):
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.mark()
        return callback_kwargs

    def step_seconds(self) -> list[float]:
        """Seconds between consecutive steps (the first step, which follows text encoding, left out)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (new shapes that recompile add to it)."""
    from ...compat.torch import graph_count

    return graph_count()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(pipe, device: str, kwargs: dict):
    """(the pipeline's output, wall seconds of the call, device work included)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = pipe(**kwargs)
    synchronize(device)
    return out, time.perf_counter() - t0
