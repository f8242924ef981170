"""The attention kernel (``attention=``): sd3plugin's SD3 processor on every joint attention, FA4's kernel
cache under ``cache_dir``, FA4's compile started early in a child process (``fa4_prewarm``)."""
from __future__ import annotations

from ..cache import cache_paths
from ..compat import diffusers as dcompat
from ..kernels import attention as kernels
from ..kernels import fa4, fa4_prewarm
from ..global_settings import GLOBAL_SETTINGS
from .base import Handle, Run

NAME = "attention"


def _fa4_dir(plan) -> str:
    return str(cache_paths(plan.cache_dir)["inductor"] / "fa4")


def choose_kernel(run: Run) -> tuple[str, str]:
    plan = run.plan
    if run.backend.name == "nexfort":
        return "sdpa", "backend=nexfort: torch's scaled_dot_product_attention (nexfort's stack is torch 2.4)"
    return kernels.resolve_kernel(plan.attention, plan.device, run.transformer.dtype)


def set_processors(transformer, kernel: str, joint: bool | None = None) -> Handle:
    """Install SD3AttnProcessor(kernel) where a module runs one of diffusers' joint processors (others,
    such as IP-Adapter's, stay). The handle puts the original processors back."""
    modules = dcompat.attention_modules(transformer)
    originals = {name: m.processor for name, m in modules if dcompat.is_joint_processor(m.processor)}
    proc = kernels.SD3AttnProcessor(kernel, joint=joint)
    for name, m in modules:
        if name in originals:
            m.set_processor(proc)

    def undo():
        for name, m in dcompat.attention_modules(transformer):
            if name in originals:
                m.set_processor(originals[name])

    return Handle(NAME, undo, {"modules": len(originals)})


def apply(run: Run) -> Handle | None:
    if not run.compiling:
        return None
    plan = run.plan
    with GLOBAL_SETTINGS.recording() as changes:
        if plan.attention != "sdpa" and run.backend.name != "nexfort":  # FA4 keeps its kernels under cache_dir
            GLOBAL_SETTINGS.set_env("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
            GLOBAL_SETTINGS.set_env("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", _fa4_dir(plan))
            for flag, value in fa4.fa4_cache_flags(_fa4_dir(plan)).items():  # FA4 imported already
                GLOBAL_SETTINGS.set_flag(flag, value)
    kernel, why = choose_kernel(run)
    handle = set_processors(run.transformer, kernel, joint=plan.joint_attention and kernel == "fa4")
    restore_processors = handle.undo
    handle.undo = lambda: (restore_processors(), GLOBAL_SETTINGS.revert(changes))
    run.report["attention"] = {"kernel": kernel, "reason": why, "modules": handle.report["modules"]}
    if kernel == "fa4":  # FA4's JIT compile runs in a child process while inductor compiles
        run.report["attention"]["prewarm"] = _start_prewarm(run)
    return handle


def _start_prewarm(run: Run) -> dict:
    plan, t = run.plan, run.transformer
    if not plan.fa4_prewarm:
        return {"state": "skipped: fa4_prewarm=false"}
    shapes = fa4_prewarm.attention_shapes(t.config, plan.height, plan.width, plan.num_images, plan.cfg_guidance)
    if fa4.fa4_cache_dir() != _fa4_dir(plan):  # flash-attn-4 was imported before cache_dir was set
        return {"state": f"skipped: FA4 caches its kernels in {fa4.fa4_cache_dir()}, not under cache_dir "
                         "(flash_attn.cute was imported before sd3plugin set its cache directory)"}
    return fa4_prewarm.start(_fa4_dir(plan), shapes, t.dtype, t.device.index or 0)


def finish(run: Run) -> None:
    """After quantizing: how many joint attentions run as one op (quantized projections do not)."""
    if run.compiling and "attention" in run.report:
        run.report["attention"]["joint_op_modules"] = kernels.joint_op_modules(run.transformer)
