"""Process-wide settings the plugin changes (torch.backends flags, dynamo limits, cache env vars).

Every change goes through ``GLOBAL_SETTINGS.set_flag/set_env``, which remembers the first previous
value, so ``GLOBAL_SETTINGS.restore()`` (called by ``sd3plugin.disable()``) undoes all of them.
``snapshot()`` captures the values an optimized pipeline needs; its compiled calls run inside
``scoped(snapshot)``, so they keep their cache dir and flags after ``disable()`` too.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

_MISSING = object()


def _resolve(path: str):
    """'cuda.matmul.allow_tf32' -> (torch.backends.cuda.matmul, 'allow_tf32'); 'dynamo.x' -> dynamo config;
    'package.module:attr' -> (that module, 'attr'); 'package.module:Class.attr' -> (that class, 'attr')."""
    import torch

    if ":" in path:
        import importlib

        module, attr = path.split(":", 1)
        obj = importlib.import_module(module)
        *owners, attr = attr.split(".")
        for part in owners:
            obj = getattr(obj, part)
        return obj, attr
    head, _, attr = path.rpartition(".")
    if head.startswith("dynamo"):
        import torch._dynamo

        obj = torch._dynamo.config
    else:
        obj = torch.backends
        for part in head.split("."):
            obj = getattr(obj, part)
    return obj, attr


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


class GlobalSettings:
    def __init__(self):
        self._saved_flags: dict[str, object] = {}
        self._saved_env: dict[str, object] = {}

    def set_flag(self, path: str, value) -> None:
        obj, attr = _resolve(path)
        if not hasattr(obj, attr):
            return
        self._saved_flags.setdefault(path, getattr(obj, attr))
        setattr(obj, attr, value)

    def set_env(self, name: str, value: str) -> None:
        self._saved_env.setdefault(name, os.environ.get(name, _MISSING))
        os.environ[name] = value

    def changed(self) -> dict:
        return {"flags": dict(self._saved_flags), "env": {k: (None if v is _MISSING else v)
                                                          for k, v in self._saved_env.items()}}

    def snapshot(self) -> dict:
        """The values now in effect for every setting the plugin changed."""
        flags = {}
        for path in self._saved_flags:
            obj, attr = _resolve(path)
            flags[path] = getattr(obj, attr)
        return {"flags": flags, "env": {name: os.environ.get(name) for name in self._saved_env}}

    @contextmanager
    def scoped(self, snapshot: dict):
        """Apply ``snapshot`` for the length of a block, then put back what was there."""
        saved_flags, saved_env = {}, {}
        for path, value in snapshot["flags"].items():
            obj, attr = _resolve(path)
            saved_flags[path] = getattr(obj, attr)
            setattr(obj, attr, value)
        for name, value in snapshot["env"].items():
            saved_env[name] = os.environ.get(name)
            _set_env(name, value)
        try:
            yield
        finally:
            for path, value in saved_flags.items():
                obj, attr = _resolve(path)
                setattr(obj, attr, value)
            for name, value in saved_env.items():
                _set_env(name, value)

    def restore(self) -> None:
        for path, value in self._saved_flags.items():
            obj, attr = _resolve(path)
            setattr(obj, attr, value)
        for name, value in self._saved_env.items():
            if value is _MISSING:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_flags.clear()
        self._saved_env.clear()


GLOBAL_SETTINGS = GlobalSettings()
