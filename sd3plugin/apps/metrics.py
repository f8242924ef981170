"""Timing and memory helpers shared by sd3plugin-run, sd3plugin-bench and the cache CLI."""
from __future__ import annotations

import resource
import statistics
import time

import torch


class StepTimer:
    """``callback_on_step_end`` for diffusers pipelines: records the wall time of every denoising step.

    On CUDA it synchronizes before reading the clock so each step's time is its GPU time.
    """

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self._last = None

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()
        self.times.clear()

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self._sync()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now
        return callback_kwargs

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def its(self) -> float:
        return 1.0 / self.median if self.times else float("nan")


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of the process (CPU), in GiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
