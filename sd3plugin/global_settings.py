"""Process-wide settings the plugin changes (torch.backends flags, dynamo limits, cache env vars).

Every change goes through ``GLOBAL_SETTINGS.set(...)``, which remembers the first previous value, so
``GLOBAL_SETTINGS.restore()`` (called by ``sd3plugin.disable()``) undoes all of them.
"""
from __future__ import annotations

import os

_MISSING = object()


def _resolve(path: str):
    """'cuda.matmul.allow_tf32' -> (torch.backends.cuda.matmul, 'allow_tf32'); 'dynamo.x' -> dynamo config."""
    import torch

    head, _, attr = path.rpartition(".")
    if head.startswith("dynamo"):
        import torch._dynamo

        obj = torch._dynamo.config
    else:
        obj = torch.backends
        for part in head.split("."):
            obj = getattr(obj, part)
    return obj, attr


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
