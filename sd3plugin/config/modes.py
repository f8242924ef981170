"""Mode tokens: the colon-separated compile-mode strings of onediff/nexfort, and what each does here.

``parse_mode("max-optimize:max-autotune:low-precision")`` validates a spec and expands presets (``O2``,
``O3``). ``inductor_options(tokens, device)`` turns tokens into torch.compile / inductor settings.
The same table renders docs/modes.md (``python -m sd3plugin.config.modes_table``: a module of its own, which
nothing imports, so running it does not re-execute a module the package already loaded).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class Token:
    name: str
    summary: str
    inductor: dict = field(default_factory=dict)   # inductor config keys set for this token
    cuda_inductor: dict = field(default_factory=dict)  # only on CUDA (Triton kernels)
    torch_flags: dict = field(default_factory=dict)  # process-wide torch.backends flags (restored on disable)
    inductor_note: str = ""
    nexfort_note: str = ""


TOKENS: dict[str, Token] = {t.name: t for t in [
    Token("max-optimize", "enable all graph optimizations",
          inductor={"aggressive_fusion": True},
          cuda_inductor={"coordinate_descent_tuning": True},
          inductor_note="aggressive_fusion; on CUDA coordinate-descent tuning of Triton kernels; fused QKV",
          nexfort_note="nexfort's full optimization pass pipeline"),
    Token("max-autotune", "autotune GEMM/conv kernels",
          inductor={"max_autotune": True, "max_autotune_gemm": True},
          inductor_note="max_autotune (Triton/CUTLASS GEMM templates benchmarked at compile time)",
          nexfort_note="Triton autotuning (its persistent autotune cache is a licensed feature upstream)"),
    Token("low-precision", "allow reduced-precision accumulation",
          torch_flags={"cuda.matmul.allow_tf32": True, "cudnn.allow_tf32": True,
                       "cuda.matmul.allow_fp16_reduced_precision_reduction": True,
                       "cuda.matmul.allow_bf16_reduced_precision_reduction": True},
          inductor_note="TF32 and fp16/bf16 reduced-precision reductions in cuBLAS/cuDNN",
          nexfort_note="low-precision kernels and reductions"),
    Token("cudagraphs", "capture CUDA graphs to remove launch overhead",
          cuda_inductor={"triton.cudagraphs": True},
          inductor_note="one CUDA graph of the whole transformer step per input shape, captured after two "
                        "warm-up calls (inductor's per-block graph trees fail on regional compile); ignored on CPU",
          nexfort_note="CUDA graphs"),
    Token("cache-all", "turn on every compile cache",
          inductor={"fx_graph_cache": True, "autotune_local_cache": True},
          inductor_note="FX-graph and autotune caches (on by default here; always under cache_dir)",
          nexfort_note="inductor autotuning and FX-graph caches; with NEXFORT_GRAPH_CACHE=1 its graph cache"),
    Token("freezing", "fold weights into the graph as constants",
          inductor={"freezing": True},
          inductor_note="inductor freezing: compiled artefacts depend on weight values (not shippable as a "
                        "weight-free cache)",
          nexfort_note="freezing"),
    Token("benchmark", "let cuDNN pick kernels by benchmarking",
          torch_flags={"cudnn.benchmark": True},
          inductor_note="torch.backends.cudnn.benchmark",
          nexfort_note="cuDNN benchmark mode"),
    Token("jit", "compile quickly with light optimization",
          inductor={"max_autotune": False, "coordinate_descent_tuning": False},
          inductor_note="no autotuning, no coordinate-descent tuning: shortest compile",
          nexfort_note="nexfort's JIT path: quick compile"),
    Token("disable-runtime-fusion", "do not fuse pointwise ops into GEMM epilogues",
          inductor={"epilogue_fusion": False},
          inductor_note="epilogue_fusion=False",
          nexfort_note="disables runtime kernel fusion"),
    Token("quant", "compile a quantized model (needs quant= a preset other than none)",
          inductor_note="marker: requires quant=<preset>; quantization happens before compilation",
          nexfort_note="marker for quantized compilation"),
]}

PRESETS: dict[str, str] = {
    "O2": "max-optimize:low-precision",
    "O3": "max-optimize:max-autotune:low-precision:cudagraphs",
}

CONFLICTS = [("jit", "max-autotune"), ("jit", "max-optimize"), ("disable-runtime-fusion", "max-optimize")]


def parse_mode(spec: str) -> tuple[str, ...]:
    """Validate ``spec`` and return its tokens with presets expanded, in order, without duplicates."""
    if spec is None:
        return ()
    if not isinstance(spec, str):
        raise ConfigError(f"mode.spec must be a string of ':'-separated tokens, got {spec!r}")
    tokens: list[str] = []
    for raw in spec.split(":"):
        tok = raw.strip()
        if not tok:
            continue
        expanded = PRESETS[tok].split(":") if tok in PRESETS else [tok]
        for t in expanded:
            if t not in TOKENS:
                raise ConfigError(
                    f"unknown mode token {t!r} in mode.spec={spec!r}; valid tokens: "
                    f"{', '.join(TOKENS)}; presets: {', '.join(PRESETS)}")
            if t not in tokens:
                tokens.append(t)
    for a, b in CONFLICTS:
        if a in tokens and b in tokens:
            raise ConfigError(f"mode tokens {a!r} and {b!r} contradict each other in mode.spec={spec!r}; "
                              f"drop one of them")
    return tuple(tokens)


def inductor_options(tokens: tuple[str, ...], device: str) -> dict:
    opts: dict = {}
    for t in tokens:
        opts.update(TOKENS[t].inductor)
        if device == "cuda":
            opts.update(TOKENS[t].cuda_inductor)
    return opts


def torch_flags(tokens: tuple[str, ...], device: str) -> dict:
    if device != "cuda":
        return {}
    flags: dict = {}
    for t in tokens:
        flags.update(TOKENS[t].torch_flags)
    return flags


def markdown_table() -> str:
    rows = ["| token | what it asks for | inductor backend (this plugin) | nexfort backend |",
            "|---|---|---|---|"]
    for t in TOKENS.values():
        rows.append(f"| `{t.name}` | {t.summary} | {t.inductor_note} | {t.nexfort_note} |")
    for name, spec in PRESETS.items():
        rows.append(f"| `{name}` | preset | expands to `{spec}` | passed to nexfort as `{name}` |")
    return "\n".join(rows)

