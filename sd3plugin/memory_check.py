"""Does a random-weight architecture preset fit this machine? Checked before building or loading it.

The parameter count of each component comes from building it on the ``meta`` device (no memory, well
under a second); building draws every component in float32 and casts it to the pipeline's dtype at once,
so the peak is the finished components plus the one in float32 being built, and loading holds the whole
pipeline in host memory before it moves to the device. Free memory: ``MemAvailable`` of /proc/meminfo
(or ``os.sysconf``), bounded by the cgroup's limit, and ``torch.cuda.mem_get_info`` on a GPU.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

from .errors import ModelError

GiB = 2**30
SAVE_SHARD_BYTES = 10 * 10**9  # diffusers' default max_shard_size: one shard is serialized in memory at a time


@functools.lru_cache(maxsize=None)
def preset_parameters(arch: str) -> dict[str, int]:
    """{component: number of parameters} of an architecture preset (built on the meta device)."""
    import torch

    from .models import component_builders

    counts = {}
    with torch.device("meta"):
        for name, build in component_builders(arch).items():
            module = build()
            counts[name] = 0 if module is None else sum(p.numel() for p in module.parameters())
    return counts


def build_bytes(arch: str, itemsize: int) -> int:
    """Peak bytes on the build device: the components built so far in the pipeline's dtype plus the one
    being drawn in float32."""
    done, peak = 0, 0
    for n in preset_parameters(arch).values():
        peak = max(peak, done + 4 * n)
        done += itemsize * n
    return peak


def pipeline_bytes(arch: str, itemsize: int) -> int:
    """Bytes of the finished pipeline's weights in a dtype of ``itemsize`` bytes."""
    return itemsize * sum(preset_parameters(arch).values())


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> Optional[int]:
    """memory.max - memory.current of this process's cgroup (v2), when it sets a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_ram_bytes() -> Optional[int]:
    """Host memory this process can still take (None: unknown)."""
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(known) if known else None


def free_gpu_bytes() -> Optional[int]:
    """Free memory of the current CUDA device (None: no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _refuse(arch: str, dtype_name: str, what: str, need: int, have: int, where: str, fix: str) -> ModelError:
    billions = sum(preset_parameters(arch).values()) / 1e9
    return ModelError(f"model={arch} ({billions:.1f} B parameters in {dtype_name}) needs about {_gib(need)} of "
                      f"{where} to {what}, but this machine has {_gib(have)} available; {fix}")


def host_needs(arch: str, itemsize: int, device: str, building: bool) -> list[tuple[str, int]]:
    """[(step, bytes of host memory it needs)] for getting the preset onto ``device``."""
    weights = pipeline_bytes(arch, itemsize)
    shard = min(max(preset_parameters(arch).values()) * itemsize, SAVE_SHARD_BYTES)  # serialized at once
    needs = []
    if building and device == "cuda":
        needs.append(("write it to disk", shard))  # a shard is serialized in host memory
    elif building:
        needs += [("build it", build_bytes(arch, itemsize)), ("write it to disk", weights + shard)]
    needs.append(("load it", weights))  # from_pretrained reads into host memory, then moves to the device
    return needs


def check_preset_fits(arch: str, dtype, device: str, building: bool) -> None:
    """Raise a ModelError naming the need and the free memory when the preset cannot be built (``building``)
    and loaded here: host memory, and GPU memory when it is built or run on the GPU."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).split(".")[-1]
    smaller = "use model=tiny, or a machine with more memory"
    ram = available_ram_bytes()
    what, need = max(host_needs(arch, itemsize, device, building), key=lambda step: step[1])
    if ram is not None and need > ram:
        gpu_hint = "" if device == "cuda" else " (device=cuda builds and runs it on a GPU)"
        raise _refuse(arch, dtype_name, what, need, ram, "host memory", smaller + gpu_hint)
    gpu = free_gpu_bytes() if device == "cuda" else None
    if gpu is not None:
        need = build_bytes(arch, itemsize) if building else pipeline_bytes(arch, itemsize)
        if need > gpu:
            raise _refuse(arch, dtype_name, "build it" if building else "hold it", need, gpu, "free GPU memory",
                          smaller + " (or free the GPU)")
