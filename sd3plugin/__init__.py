"""sd3plugin: fast Stable Diffusion 3 for diffusers.

    import sd3plugin
    pipe = sd3plugin.optimize(pipe, overrides=["mode=max-autotune"])   # explicit
    sd3plugin.enable(overrides=["backend=inductor"])                    # transparent from_pretrained hook
    sd3plugin.report(pipe)                                               # what was applied, and why

``import sd3plugin`` imports nothing heavy (no torch, diffusers, Hydra, OmegaConf): the API functions are
loaded at their first use (module ``__getattr__``), so a process pays only for what it runs
(``tests/test_imports.py`` holds this).
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import BackendUnavailableError, CompileError, ConfigError, SD3PluginError

__version__ = "0.1.0"

# public name -> the module that defines it (imported at first access)
_LAZY = {"optimize": ".optimize", "report": ".optimize", "undo": ".optimize", "enable": ".hook",
         "enabled": ".hook", "disable": ".hook", "is_enabled": ".hook"}

__all__ = ["optimize", "enable", "enabled", "disable", "is_enabled", "report", "undo", "ConfigError",
           "CompileError", "BackendUnavailableError", "SD3PluginError", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sd3plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule ``sd3plugin.optimize`` makes Python set the package attribute ``optimize`` to
    that module; the API name stays the function (as it was when ``__init__`` imported it eagerly)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
