"""Errors of the cache tools. Each carries the name of its exit code (see ``sd3plugin.cli.exit_codes``)."""
from __future__ import annotations

from ..errors import SD3PluginError


class CacheError(SD3PluginError):
    """Base class; ``exit_name`` is the key of the exit code in ``cli/exit_codes.py``."""

    exit_name = "error"


class CorruptArchiveError(CacheError):
    """Checksum mismatch, truncated stream, missing/extra member or unsafe member (never overridable)."""

    exit_name = "corrupt"


class IncompatibleCacheError(CacheError):
    """The archive was built for another torch/triton/python/GPU (``--force`` overrides)."""

    exit_name = "incompatible"


class CacheNotFoundError(CacheError):
    exit_name = "not_found"


class CacheLockedError(CacheError):
    exit_name = "locked"


class CacheWriteError(CacheError):
    exit_name = "cannot_write"


class UntrustedArchiveError(CacheError):
    """A trusted key is set (``--trust`` / ``SD3PLUGIN_TRUSTED_KEY``) and the archive is unsigned or its
    signature does not verify (never overridable)."""

    exit_name = "untrusted"


class NothingCompiledError(CacheError):
    """``verify`` had to compile: the installed cache did not cover this config/shape."""

    exit_name = "compiled"
