"""Exceptions of sd3plugin. Every one names the problem and the fix."""


class SD3PluginError(Exception):
    """Base class of every error sd3plugin raises on purpose."""


class ConfigError(SD3PluginError, ValueError):
    """A config value, override, mode token or shape is invalid (exit code 2 on the command line)."""


class BackendUnavailableError(SD3PluginError, RuntimeError):
    """The requested backend cannot run here (not installed, wrong torch, no licence...)."""


class CompileError(SD3PluginError, RuntimeError):
    """Compilation failed and on_error=raise."""


class ModelError(ConfigError):
    """``model=`` names nothing loadable here (no such folder, no Hub access, too large for this machine);
    a config mistake: exit code 2 on the command line."""


class NotWritableError(SD3PluginError, OSError):
    """A folder or file a command must write (output_dir, the image, the working folder, cache_dir) cannot be
    written: read-only, no permission, a file in the way. Exit code 8 (``cannot_write``) on the command line."""


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a KeyboardInterrupt (torch's compile errors wrap what stopped them): a Ctrl-C
    must stop the run, never count as a failure to fall back from."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
