"""sd3plugin: fast Stable Diffusion 3 for diffusers.

    import sd3plugin
    pipe = sd3plugin.optimize(pipe, overrides=["mode=max-autotune"])   # explicit
    sd3plugin.enable(overrides=["backend=inductor"])                    # transparent from_pretrained hook
    sd3plugin.report(pipe)                                               # what was applied, and why
"""
from .errors import BackendUnavailableError, CompileError, ConfigError, SD3PluginError
from .hook import disable, enable, enabled, is_enabled
from .optimize import optimize, report, undo

__version__ = "0.1.0"

__all__ = ["optimize", "enable", "enabled", "disable", "is_enabled", "report", "undo", "ConfigError",
           "CompileError", "BackendUnavailableError", "SD3PluginError", "__version__"]
