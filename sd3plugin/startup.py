"""Where the time of a start goes: ``report(pipe)["startup"]`` and ``sd3plugin-cache verify``'s breakdown.

The fields are documented in docs/cache.md (start-up breakdown). Collected where they happen:

- ``load``: each component's ``from_pretrained`` (the hook times diffusers' per-component load), the move to
  the device (``load_pipeline``);
- ``cache``: the Mega-Cache blobs and precompiled blocks loaded (``settings``, ``compile`` transforms);
- ``first_call``: the transformer's first call, split by Dynamo's own timers into tracing, inductor
  (compile or cache lookup), kernel loading and autotuning (``compat.torch.compile_breakdown``);
- ``cuda_graph_capture_seconds``, ``attention_kernel`` (FlashAttention-4's import and first calls);
- ``first_image``: text encoding, denoising (every transformer call of the first image, compile included)
  and VAE decode of the pipeline's first call (``FirstImageTimer``, one-shot);
- ``imports`` (verify only): the heaviest top-level imports of the process (``python -X importtime``).
"""
from __future__ import annotations

import time

TOP_IMPORTS = 12


def parse_importtime(text: str, top: int = TOP_IMPORTS) -> dict:
    """``python -X importtime`` output -> {"seconds": all import time, "top": [{module, seconds}]}: the
    packages that took longest to import, each module's own time added to its top-level package (torch
    imported by diffusers counts for torch), wherever the import happened (also inside loading or the
    first call)."""
    by_package: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("import time:") or line.count("|") < 2:
            continue
        own, _, name = line[len("import time:"):].split("|", 2)
        if not own.strip().isdigit():
            continue  # the header line
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + int(own)
    rows = sorted(by_package.items(), key=lambda kv: -kv[1])
    return {"seconds": round(sum(by_package.values()) / 1e6, 3),
            "top": [{"module": m, "seconds": round(us / 1e6, 3)} for m, us in rows[:top]]}


def _sync(device) -> None:
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


class FirstImageTimer:
    """Times the first pipeline call: ``encode_prompt`` (text encoding), then the denoising loop until the
    first ``vae.decode`` starts, then the decode itself. Installed as instance attributes; after the first
    decode it only passes calls through. ``remove()`` puts back what it wrapped."""

    def __init__(self, pipe, startup: dict):
        self.pipe, self.startup, self.done = pipe, startup, False
        self.encoded_at: float | None = None
        self._saved: list = []
        self._wrap(pipe, "encode_prompt", self._encode)
        self._wrap(pipe.vae, "decode", self._decode)

    def _wrap(self, owner, name: str, make) -> None:
        if owner is None or not callable(getattr(owner, name, None)):
            return
        self._saved.append((owner, name, owner.__dict__.get(name)))
        inner = getattr(owner, name)
        setattr(owner, name, make(inner))

    def _encode(self, inner):
        def encode_prompt(*args, **kwargs):
            if self.done or self.encoded_at is not None:
                return inner(*args, **kwargs)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(getattr(self.pipe, "device", "cpu"))
            self.encoded_at = time.perf_counter()
            self.startup.setdefault("first_image", {})["text_encoding_seconds"] = round(self.encoded_at - t0, 3)
            return out
        return encode_prompt

    def _decode(self, inner):
        def decode(*args, **kwargs):
            if self.done:
                return inner(*args, **kwargs)
            self.done = True
            _sync(getattr(self.pipe, "device", "cpu"))
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(getattr(self.pipe, "device", "cpu"))
            first = self.startup.setdefault("first_image", {})
            if self.encoded_at is not None:
                first["denoising_seconds"] = round(t0 - self.encoded_at, 3)
            first["vae_seconds"] = round(time.perf_counter() - t0, 3)
            return out
        return decode

    def remove(self) -> None:
        for owner, name, previous in reversed(self._saved):
            if previous is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, previous)
        self._saved.clear()


def summary_line(startup: dict) -> str:
    """One line of the breakdown for verify's text output (the fields that are there)."""
    parts = []
    imports = startup.get("imports") or {}
    if imports.get("top"):
        heavy = ", ".join(f"{r['module']} {r['seconds']:.1f}" for r in imports["top"][:3])
        parts.append(f"imports {imports['seconds']:.1f} s ({heavy})")
    load = startup.get("load") or {}
    if load.get("components"):
        comps = sorted(load["components"].items(), key=lambda kv: -kv[1])[:3]
        parts.append(f"load {load.get('seconds', 0):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in comps) + ")")
    cache = startup.get("cache") or {}
    if cache:
        parts.append(f"cache {cache.get('megacache_seconds', 0) + cache.get('precompiled_seconds', 0):.1f} s")
    first = startup.get("first_call") or {}
    if first:
        parts.append(f"tracing {first.get('dynamo_tracing_seconds', 0):.1f} s, inductor "
                     f"{first.get('inductor_compile_seconds', 0):.1f} s, kernels {first.get('kernel_loading_seconds', 0):.1f} s, "
                     f"autotuning {first.get('autotuning_seconds', 0):.1f} s ({first.get('autotuned_kernels', 0)} kernels, "
                     f"{first.get('coordesc_benchmarks', 0)} coordinate-descent benchmarks)")
    if startup.get("cuda_graph_capture_seconds"):
        parts.append(f"CUDA graphs {startup['cuda_graph_capture_seconds']:.1f} s")
    att = startup.get("attention_kernel") or {}
    if att.get("import_seconds") or att.get("first_call_seconds"):
        parts.append(f"FA4 {att.get('import_seconds') or 0:.1f} s import + {att.get('first_call_seconds') or 0:.1f} s first calls")
    img = startup.get("first_image") or {}
    if img:
        parts.append(f"first image: text {img.get('text_encoding_seconds', 0):.1f} s, denoising "
                     f"{img.get('denoising_seconds', 0):.1f} s, VAE {img.get('vae_seconds', 0):.1f} s")
    if "other_seconds" in startup:
        parts.append(f"unnamed {startup['other_seconds']:.2f} s")
    return "start-up: " + "; ".join(parts) if parts else ""
