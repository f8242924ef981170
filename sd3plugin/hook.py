"""The transparent hook: ``enable()`` wraps diffusers' ``from_pretrained`` so SD3 pipelines come back
optimized; ``disable()`` puts the original descriptors back (identity preserved).

Patched: ``DiffusionPipeline.from_pretrained`` (which every SD3 pipeline class inherits, and which
``AutoPipelineFor*`` and ``DiffusionPipeline`` call) and ``SD3Transformer2DModel.from_pretrained``. A
transformer loaded as part of a pipeline is optimized once, with its pipeline.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import time
from typing import Iterable

from .config import compose
from .model_source import mark_load_error
from .global_settings import GLOBAL_SETTINGS

log = logging.getLogger("sd3plugin")
_MISSING = object()
_in_pipeline_load = contextvars.ContextVar("sd3plugin_in_pipeline_load", default=False)


class Hook:
    """An installed hook. Also a context manager: ``with sd3plugin.enable(overrides=[...]): ...``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._saved: list[tuple[type, str, object]] = []

    # -- install / uninstall -------------------------------------------------------------------------
    def install(self) -> None:
        from diffusers import DiffusionPipeline, SD3Transformer2DModel

        self._patch(DiffusionPipeline, self._wrap_pipeline)
        self._patch(SD3Transformer2DModel, self._wrap_transformer)

    def _patch(self, cls: type, make) -> None:
        saved = cls.__dict__.get("from_pretrained", _MISSING)
        original = cls.from_pretrained.__func__  # the function the class resolves today
        self._saved.append((cls, "from_pretrained", saved))
        setattr(cls, "from_pretrained", classmethod(make(original)))

    def uninstall(self) -> None:
        for cls, name, saved in reversed(self._saved):
            if saved is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, saved)
        self._saved.clear()

    # -- wrappers --------------------------------------------------------------------------------------
    def _wrap_pipeline(self, original):
        hook = self

        @functools.wraps(original)
        def from_pretrained(cls, *args, **kwargs):
            from .compat.diffusers import timed_component_loads

            token = _in_pipeline_load.set(True)
            started = time.perf_counter()
            try:
                with timed_component_loads() as components:
                    pipe = original(cls, *args, **kwargs)
            except Exception as exc:  # diffusers could not load it: a model problem, not an optimization one
                mark_load_error(exc)
                raise
            finally:
                _in_pipeline_load.reset(token)
            loaded = time.perf_counter() - started
            from .optimize import is_sd3_pipeline, optimize, record_startup

            if is_sd3_pipeline(pipe) and not _in_pipeline_load.get():
                optimize(pipe, hook.cfg)
                record_startup(pipe, "load", {"seconds": round(loaded, 3), "components": dict(components)})
            return pipe
        from_pretrained.__sd3plugin_hook__ = True
        return from_pretrained

    def _wrap_transformer(self, original):
        hook = self

        @functools.wraps(original)
        def from_pretrained(cls, *args, **kwargs):
            model = original(cls, *args, **kwargs)
            if not _in_pipeline_load.get():
                from .optimize import optimize

                optimize(model, hook.cfg)
            return model
        from_pretrained.__sd3plugin_hook__ = True
        return from_pretrained

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        disable()
        return False


_ACTIVE: Hook | None = None


def enable(cfg=None, overrides: Iterable[str] = ()) -> Hook:
    """Install the hook (validating the config first). Calling it again replaces the config: one hook."""
    global _ACTIVE
    composed = compose(cfg, overrides)  # validate before touching diffusers
    if _ACTIVE is not None:
        _ACTIVE.cfg = composed
        return _ACTIVE
    hook = Hook(composed)
    hook.install()
    _ACTIVE = hook
    log.info("sd3plugin: hook enabled (backend=%s, mode=%s)", composed.backend, composed.mode.spec)
    return hook


def disable() -> None:
    """Uninstall the hook and restore every process-wide setting the plugin changed."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.uninstall()
        _ACTIVE = None
    GLOBAL_SETTINGS.restore()


def is_enabled() -> bool:
    return _ACTIVE is not None


class _Enabled:
    """``with sd3plugin.enabled(...)``: on exit, the config that was active before (an outer block's) is
    active again; leaving the outermost block disables the hook."""

    def __init__(self, cfg, overrides):
        self.previous = _ACTIVE.cfg if _ACTIVE is not None else None
        self.hook = enable(cfg, overrides)

    def __enter__(self) -> Hook:
        return self.hook

    def __exit__(self, *exc):
        if self.previous is None or _ACTIVE is None:
            disable()
        else:
            _ACTIVE.cfg = self.previous
        return False


def enabled(cfg=None, overrides: Iterable[str] = ()) -> _Enabled:
    """Context-manager form: ``with sd3plugin.enabled(overrides=["mode=max-autotune"]): ...``; nests."""
    return _Enabled(cfg, overrides)
