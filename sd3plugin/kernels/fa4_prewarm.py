"""Compile FlashAttention-4's kernel in a child process while torch.compile works on the transformer.

FA4 JIT-compiles its CuTe kernel at the first call (about 14 s on an H100), and on a cold start that first
call comes only after inductor has compiled the first transformer block, so the two waits add up.
``start()`` launches this file as a script (it imports only torch and flash-attn, not sd3plugin) that runs
FA4 once at the shapes the pipeline will use, with the same call as ``sd3plugin::fa4_attention``; FA4
writes the compiled kernel into its persistent cache (``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR``, under
``cache_dir``; written atomically under a file lock). The first real FA4 call waits for the child
(``wait_pending()``) and then loads the kernel from disk instead of compiling it.

``SD3PLUGIN_FA4_PREWARM=0`` turns it off (to measure what it saves). Skipped when the FA4 cache already
holds compiled kernels (a warm start: loading them takes
milliseconds, a child would only cost its import time). If the child fails or takes longer than
``TIMEOUT`` seconds, the parent compiles the kernel itself, as it would without this module.
"""
from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("sd3plugin")
ENV = "SD3PLUGIN_FA4_PREWARM"
TIMEOUT = 300.0
TEXT_TOKENS = 77 + 256  # CLIP tokens + T5 tokens (diffusers' SD3 default max_sequence_length=256)
VAE_SCALE = 8  # the SD3 / SD3.5 VAEs downsample by 8

_PENDING: list["Prewarm"] = []  # children not waited for yet (emptied by wait_pending)


def attention_shapes(transformer_config, height: int | None, width: int | None, images: int,
                     guidance: bool) -> list[tuple[int, int, int, int]]:
    """The (batch, seq, heads, head_dim) shapes the transformer's attention runs at for one pipeline call:
    joint attention (image + text tokens), plus image-only attention where SD3.5 has dual-attention blocks."""
    c = transformer_config
    patch = VAE_SCALE * c.patch_size
    h = (height or c.sample_size * VAE_SCALE) // patch
    w = (width or c.sample_size * VAE_SCALE) // patch
    batch = images * (2 if guidance else 1)
    shapes = [(batch, h * w + TEXT_TOKENS, c.num_attention_heads, c.attention_head_dim)]
    if getattr(c, "dual_attention_layers", None):
        shapes.append((batch, h * w, c.num_attention_heads, c.attention_head_dim))
    return shapes


class Prewarm:
    """One child process compiling FA4 kernels; ``wait()`` blocks until it is done (or gives up)."""

    def __init__(self, argv: list[str], status: dict):
        self.status = status  # shared with report(pipe)["attention"]["prewarm"]: updated on wait()
        self.started = time.perf_counter()
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._stderr)
        status.update(state="running", pid=self.proc.pid)

    def wait(self, timeout: float = TIMEOUT) -> bool:
        t0 = time.perf_counter()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        waited = time.perf_counter() - t0
        self.status.update(seconds=round(time.perf_counter() - self.started, 2), waited_seconds=round(waited, 2))
        if rc == 0:
            self.status["state"] = "done"
            log.info("sd3plugin: FA4 kernel compiled in a child process in %.1f s (first call waited %.1f s)",
                     self.status["seconds"], waited)
        else:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
            self.status.update(state="failed", error=f"{why}: {' | '.join(tail)}"[:500])
            log.warning("sd3plugin: FA4 prewarm child %s; the kernel is compiled at its first call instead (%s)",
                        why, " | ".join(tail)[:300])
        self._stderr.close()
        return rc == 0


def start(cache_dir: str, shapes: list[tuple[int, int, int, int]], dtype, device_index: int) -> dict:
    """Launch the child unless FA4's cache in ``cache_dir`` has kernels already; return its status dict."""
    status = {"shapes": [list(s) for s in shapes]}
    if os.environ.get(ENV) == "0":
        status["state"] = f"off ({ENV}=0)"
        return status
    if any(name.endswith(".o") for _, _, files in os.walk(cache_dir) for name in files):
        status["state"] = "skipped: the FA4 cache already holds compiled kernels"
        return status
    argv = [sys.executable, os.path.abspath(__file__), str(dtype).replace("torch.", ""), str(device_index),
            *(",".join(map(str, s)) for s in shapes)]
    try:
        _PENDING.append(Prewarm(argv, status))
    except OSError as exc:
        status["state"] = f"not started ({exc}); compiled at the first call"
    return status


def wait_pending() -> None:
    """Wait for every running child (called by the FA4 op before its first kernel call); cheap when none."""
    while _PENDING:
        _PENDING.pop().wait()


@atexit.register
def _stop_pending() -> None:  # a child nobody waited for (no FA4 call happened) does not outlive us
    for job in _PENDING:
        job.proc.kill()


def _child(dtype_name: str, device_index: str, *shapes: str) -> None:
    import torch
    from flash_attn.cute import flash_attn_func

    torch.cuda.set_device(int(device_index))
    dtype = getattr(torch, dtype_name)
    for spec in shapes:
        b, s, h, d = (int(x) for x in spec.split(","))
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
        flash_attn_func(q, k, v)  # the same call as sd3plugin::fa4_attention: same compiled kernel
    torch.cuda.synchronize()


if __name__ == "__main__":
    _child(*sys.argv[1:])
