"""The nexfort backend through onediff: the seed document's compiler, on the torch 2.4 stack it needs.

What ``onediffx.compile_pipe(pipe, backend="nexfort", options={...})`` does for SD3, mirrored:
``memory_format`` is applied to the module with nexfort's ``apply_memory_format`` and removed from the
options (nexfort_compile has no such argument); ``mode``, ``dynamic`` and every other key of the seed's
``--compiler-config`` (our ``backend_options``) go to ``onediff.infer_compiler.compile(...,
backend="nexfort", options=...)`` as they are. Like the inductor backend, we compile the repeated
JointTransformerBlocks (regional) rather than the whole transformer: the module stays the same object,
the fallback guard around its forward sees compile errors, and ``undo`` restores it exactly.

Never imported here: the nexfort modules that end the process without a licence key
(``sd3plugin.environment.LICENSED_NEXFORT_MODULES``).
"""
from __future__ import annotations

import copy
import inspect
import os
import weakref

from .. import environment
from ..errors import ConfigError
from ..compat import torch as tcompat
from ..global_settings import GLOBAL_SETTINGS
from . import register_backend
from .base import Backend, CompilePlan, transformer_blocks

def activate_nexfort(cache_dir) -> dict:
    """Point nexfort's caches at ``cache_dir``: its compiled-graph cache (NEXFORT_GRAPH_CACHE=1) lives in
    TORCHINDUCTOR_CACHE_DIR/compiledgraph, beside inductor's FX-graph cache, so warm/pack/install cover it."""
    from ..cache import cache_paths
    from ..compat.inductor import point_cache_at

    inductor_dir = cache_paths(cache_dir)["inductor"]
    inductor_dir.mkdir(parents=True, exist_ok=True)
    point_cache_at(inductor_dir)
    GLOBAL_SETTINGS.set_env("NEXFORT_GRAPH_CACHE", "1")
    GLOBAL_SETTINGS.set_env("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    return {"nexfort_graph_cache_dir": str(inductor_dir / "compiledgraph")}


# Per transformer: the tensors replaced by the memory-format conversion, to put back on undo.
_SAVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _nexfort_compile_keys() -> set[str]:
    from nexfort.compilers import nexfort_compile

    return {name for name in inspect.signature(nexfort_compile).parameters if name != "model"}


@register_backend("nexfort")
class NexfortBackend(Backend):
    def availability(self, plan: CompilePlan) -> tuple[bool, str]:
        return environment.nexfort_status()

    def options(self, plan: CompilePlan) -> dict:
        """What onediff gets for each block: the seed's compiler-config without memory_format."""
        opts = {"mode": plan.mode_spec, "dynamic": plan.dynamic} if plan.mode_spec else {"dynamic": plan.dynamic}
        extra = copy.deepcopy(plan.options)
        if "memory_format" in extra:
            raise ConfigError("backend_options.memory_format is not a nexfort option; use memory_format="
                              f"{extra['memory_format']} (the config group) instead")
        opts.update(extra)
        unknown = sorted(set(opts) - _nexfort_compile_keys())
        if unknown:
            raise ConfigError(f"unknown nexfort option(s) {unknown} in backend_options; nexfort_compile accepts "
                              f"{sorted(_nexfort_compile_keys())}")
        return opts

    def compile(self, transformer, plan: CompilePlan) -> dict:
        from onediff.infer_compiler import compile as onediff_compile

        info = activate_nexfort(plan.cache_dir)
        if "freezing" in plan.tokens:
            # nexfort refuses its graph cache with freezing (the frozen weights would be cached).
            GLOBAL_SETTINGS.set_env("NEXFORT_GRAPH_CACHE", "0")
            info["nexfort_graph_cache_dir"] = None
        self._configure_nexfort()
        opts = self.options(plan)
        self._apply_memory_format(transformer, plan.memory_format)
        names = []
        for i, block in enumerate(transformer_blocks(transformer)):
            # Like nn.Module.compile: the block stays the same object and keeps its state dict keys.
            tcompat.set_compiled_call(block, onediff_compile(block._call_impl, backend="nexfort",
                                                             options=copy.deepcopy(opts)))
            names.append(f"transformer_blocks.{i}")
        loaded = environment.licensed_modules_loaded()
        if loaded and not os.environ.get(environment.LICENCE_ENV):  # would end the process: say why first
            raise RuntimeError(f"nexfort loaded licensed modules {loaded} without {environment.LICENCE_ENV}")
        return {"compiled_modules": names, "nexfort_options": opts, "strategy": "regional",
                "nexfort": environment.dist_version("nexfort"), "onediff": environment.dist_version("onediff"),
                **info}

    def undo(self, transformer) -> None:
        for block in transformer_blocks(transformer):
            tcompat.clear_compiled_call(block)
        saved = _SAVED.pop(transformer, None)
        if saved:
            for tensor, data in saved:
                tensor.data = data

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _configure_nexfort() -> None:
        # nexfort reads NEXFORT_GRAPH_CACHE when it is imported (by the availability check, before
        # activate_nexfort set it): apply the current value to this process too (restored on disable()).
        GLOBAL_SETTINGS.set_flag("nexfort.fx_compiler.config:graph_cache",
                                 os.environ.get("NEXFORT_GRAPH_CACHE") == "1")
        if not os.environ.get(environment.LICENCE_ENV):
            # Its persistent Triton autotune cache is a licensed feature (onediff#1165).
            if "NEXFORT_ENABLE_TRITON_AUTOTUNE_CACHE" not in os.environ:
                GLOBAL_SETTINGS.set_env("NEXFORT_ENABLE_TRITON_AUTOTUNE_CACHE", "0")

    @staticmethod
    def _apply_memory_format(transformer, name: str) -> None:
        """onediffx's convert_pipe_to_memory_format for the transformer; remembers what it replaced."""
        import torch
        from nexfort.utils.memory_format import apply_memory_format

        fmt = {"channels_last": torch.channels_last, "contiguous_format": torch.contiguous_format}.get(name)
        if fmt is None:  # preserve
            return
        tensors = [t for t in (*transformer.parameters(), *transformer.buffers())]
        before = [(t, t.data) for t in tensors]
        apply_memory_format(transformer, memory_format=fmt)
        changed = [(t, data) for t, data in before
                   if t.data_ptr() != data.data_ptr() or t.stride() != data.stride()]
        if changed:
            _SAVED[transformer] = changed
