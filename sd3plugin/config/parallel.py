"""The ``parallel`` presets (one table), the pure checks of the ``parallel`` keys and what each plugin change
becomes on xDiT's path (docs/parallel.md).

One image on several GPUs runs through xDiT (xfuser 0.7, ``pip install "sd3plugin[parallel]"``): CFG parallel
(the conditional and unconditional halves of classifier-free guidance on two GPUs), Ulysses and ring sequence
parallel (the image tokens split over GPUs, attention through all-to-all / ring exchanges), PipeFusion (the
transformer's blocks split in stages, the image in patches). They multiply: the world size, the number of
processes and GPUs, is ``(2 if cfg) x ulysses x ring x pipefusion``.

Everything here is pure (no torch, no xfuser): composing ``parallel=cfg2`` works on a laptop. How many GPUs
the machine has is checked by ``check_parallel_gpus`` (the caller counts them) before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class ParallelPreset:
    name: str
    description: str
    cfg: bool = False
    ulysses: int = 1
    ring: int = 1
    pipefusion: int = 1

    @property
    def world_size(self) -> int:
        return (2 if self.cfg else 1) * self.ulysses * self.ring * self.pipefusion


PARALLEL_PRESETS: dict[str, ParallelPreset] = {p.name: p for p in (
    ParallelPreset("none", "one process, one GPU (no xDiT)"),
    ParallelPreset("cfg2", "CFG parallel: conditional and unconditional halves on 2 GPUs", cfg=True),
    ParallelPreset("ulysses2", "Ulysses sequence parallel over 2 GPUs (all-to-all attention)", ulysses=2),
    ParallelPreset("ulysses4", "Ulysses sequence parallel over 4 GPUs", ulysses=4),
    ParallelPreset("ring2", "ring sequence parallel over 2 GPUs", ring=2),
    ParallelPreset("pipefusion2", "PipeFusion: the blocks in 2 stages, the image in patches", pipefusion=2),
    ParallelPreset("pipefusion4", "PipeFusion: the blocks in 4 stages", pipefusion=4),
    ParallelPreset("cfg2-ulysses2", "CFG parallel x Ulysses 2: 4 GPUs", cfg=True, ulysses=2),
    ParallelPreset("cfg2-ring2", "CFG parallel x ring 2: 4 GPUs", cfg=True, ring=2),
    ParallelPreset("cfg2-pipefusion2", "CFG parallel x PipeFusion 2: 4 GPUs", cfg=True, pipefusion=2),
    ParallelPreset("ulysses2-ring2", "Ulysses 2 x ring 2 (USP): 4 GPUs", ulysses=2, ring=2),
    ParallelPreset("cfg2-ulysses4", "CFG parallel x Ulysses 4: 8 GPUs", cfg=True, ulysses=4),
    ParallelPreset("cfg2-ulysses2-ring2", "CFG parallel x Ulysses 2 x ring 2: 8 GPUs", cfg=True, ulysses=2, ring=2),
)}

# parallel.launch: ``auto`` starts the ranks (torch.distributed.run), ``print`` prints that command and exits.
LAUNCH = ("auto", "print")
DEGREE_KEYS = ("ulysses", "ring", "pipefusion")
INSTALL_HINT = 'pip install "sd3plugin[parallel]" (xfuser 0.7)'


def preset_node(name: str) -> dict:
    """The keys preset ``name`` sets (the generated ``parallel`` group)."""
    p = PARALLEL_PRESETS[name]
    return {"name": p.name, "cfg": p.cfg, "ulysses": p.ulysses, "ring": p.ring, "pipefusion": p.pipefusion}


def world_size(pcfg) -> int:
    """Processes (= GPUs) the ``parallel`` keys need."""
    return (2 if pcfg.cfg else 1) * int(pcfg.ulysses) * int(pcfg.ring) * int(pcfg.pipefusion)


def is_parallel(cfg) -> bool:
    pcfg = getattr(cfg, "parallel", None)
    return pcfg is not None and world_size(pcfg) > 1


def label(pcfg) -> str:
    """How messages name the setting: the preset's name when the keys are the preset's, else the keys."""
    name = str(pcfg.name)
    if name in PARALLEL_PRESETS and preset_node(name) == {"name": name, "cfg": bool(pcfg.cfg),
                                                           **{k: int(pcfg[k]) for k in DEGREE_KEYS}}:
        return f"parallel={name}"
    parts = (["parallel.cfg=true"] if pcfg.cfg else []) + [f"parallel.{k}={int(pcfg[k])}" for k in DEGREE_KEYS
                                                            if int(pcfg[k]) != 1]
    return " ".join(parts) or "parallel=none"


def _heads(model: str) -> Optional[int]:
    from ..models import ARCHITECTURES  # lazy: models sits beside config; it reads a table only

    arch = ARCHITECTURES.get(str(model))
    return None if arch is None else int(arch.transformer.get("num_attention_heads", 0)) or None


def check_parallel_config(cfg) -> None:
    """Pure checks of the ``parallel`` keys against the rest of the config. Raises ConfigError."""
    pcfg = cfg.parallel
    for key in DEGREE_KEYS:
        if int(pcfg[key]) < 1:
            raise ConfigError(f"parallel.{key}={pcfg[key]} must be at least 1 (1: that kind of parallelism off)")
    if str(pcfg.launch) not in LAUNCH:
        raise ConfigError(f"parallel.launch={str(pcfg.launch)!r} is not valid; choose one of: {', '.join(LAUNCH)}")
    patches = pcfg.patches
    if patches is not None:
        if int(pcfg.pipefusion) == 1:
            raise ConfigError(f"parallel.patches={patches} is PipeFusion's patch count but parallel.pipefusion=1; "
                              "set parallel.pipefusion=2 (or more) or leave parallel.patches unset")
        if int(patches) < int(pcfg.pipefusion):
            raise ConfigError(f"parallel.patches={patches} must be at least parallel.pipefusion="
                              f"{pcfg.pipefusion} (one patch per stage at least); leave it unset for the default")
    if world_size(pcfg) == 1:
        return
    what = label(pcfg)
    if str(cfg.device) == "cpu":
        raise ConfigError(f"{what} runs on {world_size(pcfg)} CUDA GPUs through xDiT but device=cpu; "
                          "use device=auto or parallel=none")
    if pcfg.cfg and float(cfg.guidance_scale) <= 1:
        raise ConfigError(f"{what} puts the unconditional half of classifier-free guidance on its own GPU, but "
                          f"guidance_scale={cfg.guidance_scale} runs no unconditional half; set guidance_scale "
                          "above 1 or parallel.cfg=false")
    sp = int(pcfg.ulysses)
    heads = _heads(cfg.model)
    if sp > 1 and heads and heads % sp:
        raise ConfigError(f"{what}: Ulysses splits the {heads} attention heads of model={cfg.model} over "
                          f"{sp} GPUs, but {heads} is not a multiple of {sp}; use a Ulysses degree that divides "
                          f"{heads}, or ring parallel (parallel.ring={sp}, parallel.ulysses=1)")


# Set by torch.distributed.run in every rank it starts.
RANK_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def in_rank() -> bool:
    """Whether this process is a rank that torch.distributed.run started."""
    import os

    return all(var in os.environ for var in RANK_ENV)


def check_parallel_process(cfg) -> None:
    """A parallel config runs only in the ranks ``sd3plugin-run`` starts: elsewhere (sd3plugin-bench,
    sd3plugin-cache, the Python API, ``-m`` sweeps) one line with the fix."""
    if is_parallel(cfg) and not in_rank():
        what = label(cfg.parallel)
        raise ConfigError(f"{what} runs as one process per GPU, which only `sd3plugin-run {what}` starts (not "
                          "-m sweeps, sd3plugin-bench, sd3plugin-cache or the Python API); use parallel=none here")


def check_parallel_gpus(cfg, gpus: int) -> None:
    """The machine must have the world size's GPUs: one line naming what is missing (exit 2)."""
    if not is_parallel(cfg):
        return
    need = world_size(cfg.parallel)
    if gpus < need:
        have = "no CUDA GPU" if gpus == 0 else f"{gpus} CUDA GPU{'s' if gpus > 1 else ''}"
        raise ConfigError(f"{label(cfg.parallel)} needs {need} CUDA GPUs (one process each) but this machine has "
                          f"{have}; run it on a machine with {need} GPUs or use parallel=none")


@dataclass(frozen=True)
class Adjustment:
    """One plugin change that xDiT's path does not keep: the keys that turn it off, and the line saying so."""

    key: str
    value: object
    line: str


def adjustments(cfg) -> list[Adjustment]:
    """The plugin changes a parallel run drops (each with its one line), in key order. Kept, and so not
    listed: regional compile (inductor), the GELU epilogue, quantization (fp8/int8 Linear weights), the
    VAE's memory format and ``compile_vae``."""
    if not is_parallel(cfg):
        return []
    from .modes import parse_mode  # pure: the token table

    what, out = label(cfg.parallel), []
    if str(cfg.backend) == "nexfort":
        out.append(Adjustment("backend", "inductor", f"backend=nexfort: not kept under {what}: nexfort's torch 2.4 "
                              "stack does not run xDiT; the ranks compile with backend=inductor"))
    if cfg.fuse_qkv:
        out.append(Adjustment("fuse_qkv", False, f"fuse_qkv: not kept under {what}: xDiT's attention processor "
                              "runs to_q/to_k/to_v as separate matmuls; set fuse_qkv=false to drop this line"))
    if str(cfg.attention) not in ("auto", "sdpa"):
        out.append(Adjustment("attention", "sdpa", f"attention={cfg.attention}: not kept under {what}: xDiT "
                              "replaces every joint attention processor with its own (Ulysses / ring attention "
                              "through yunchang, its own kernel choice within a GPU); use attention=auto"))
    tokens = parse_mode(cfg.mode.spec)
    if "cudagraphs" in tokens:
        spec = ":".join(t for t in tokens if t != "cudagraphs")
        out.append(Adjustment("mode.spec", spec, f"mode token cudagraphs: not kept under {what}: the plugin "
                              "captures the whole transformer step around the transformer's own forward, which "
                              "xDiT's wrapper replaces (and sequence parallel exchanges tensors between GPUs "
                              "inside the step)"))
    return out


def fingerprint_component(cfg, rank: Optional[int] = None) -> Optional[dict]:
    """What the ``parallel`` keys add to the cache fingerprint: nothing for one process (fingerprints from
    before the group existed stay valid); the degrees and the rank for a parallel run, since each rank
    compiles its own graphs (its share of the tokens, its PipeFusion stage). ``rank``: default ``$RANK``,
    which torch.distributed.run sets in every rank."""
    import os

    if not is_parallel(cfg):
        return None
    pcfg = cfg.parallel
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    return {"cfg": bool(pcfg.cfg), **{k: int(pcfg[k]) for k in DEGREE_KEYS},
            "patches": None if pcfg.patches is None else int(pcfg.patches), "rank": int(rank)}


def xfuser_args(cfg, height: int, width: int) -> dict:
    """The keyword arguments of xfuser's ``xFuserArgs`` for a parallel run of ``cfg`` (pure)."""
    pcfg = cfg.parallel
    return {
        "model": str(cfg.model), "use_cfg_parallel": bool(pcfg.cfg), "ulysses_degree": int(pcfg.ulysses),
        "ring_degree": int(pcfg.ring), "pipefusion_parallel_degree": int(pcfg.pipefusion),
        "num_pipeline_patch": None if pcfg.patches is None else int(pcfg.patches),
        "height": int(height), "width": int(width), "num_inference_steps": int(cfg.steps),
        "guidance_scale": float(cfg.guidance_scale), "seed": int(cfg.seed), "prompt": str(cfg.prompt),
        "negative_prompt": str(cfg.negative_prompt), "output_type": "pil",
        # sd3plugin compiles (regional compile); xDiT's own whole-transformer compile stays off.
        "use_torch_compile": False, "warmup_steps": 1,
    }
