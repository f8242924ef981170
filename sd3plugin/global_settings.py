"""Process-wide settings the plugin changes (torch.backends flags, dynamo limits, cache env vars).

Every change goes through ``GLOBAL_SETTINGS.set_flag/set_env``, which remembers the first previous
value, so ``GLOBAL_SETTINGS.restore()`` (called by ``sd3plugin.disable()``) undoes all of them.
``with GLOBAL_SETTINGS.recording() as changes:`` collects the changes made inside the block;
``GLOBAL_SETTINGS.revert(changes)`` puts back what they replaced (a setting changed since by someone else
is left alone). ``optimize()`` records its changes in the pipeline's settings handle, which ``undo()`` reverts;
until then they belong to that pipeline, and ``restore()`` (``disable()``) leaves them in place: a pipeline
loaded inside ``with sd3plugin.enabled():`` keeps its cache dir and flags after the block.
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
        self._recorders: list[list] = []
        # settings held by recorded changes not yet reverted: (kind, key) -> [holders, the value they set last]
        self._owned: dict[tuple[str, str], list] = {}

    def set_flag(self, path: str, value) -> None:
        obj, attr = _resolve(path)
        if not hasattr(obj, attr):
            return
        previous = getattr(obj, attr)
        self._saved_flags.setdefault(path, previous)
        setattr(obj, attr, value)
        for changes in self._recorders:
            changes.append(("flag", path, previous, value))

    def set_env(self, name: str, value: str) -> None:
        previous = os.environ.get(name, _MISSING)
        self._saved_env.setdefault(name, previous)
        os.environ[name] = value
        for changes in self._recorders:
            changes.append(("env", name, previous, value))

    @contextmanager
    def recording(self):
        changes: list = []
        self._recorders.append(changes)
        try:
            yield changes
        finally:
            self._recorders.remove(changes)
            for kind, key, _previous, value in changes:
                held = self._owned.setdefault((kind, key), [0, value])
                held[0] += 1
                held[1] = value

    def revert(self, changes: list) -> None:
        """Undo ``changes`` (from ``recording()``), newest first; settings changed since are left alone."""
        for kind, key, previous, value in reversed(changes):
            held = self._owned.get((kind, key))
            if held is not None:
                held[0] -= 1
                if held[0] <= 0:
                    del self._owned[(kind, key)]
            if kind == "flag":
                obj, attr = _resolve(key)
                if getattr(obj, attr) is value or getattr(obj, attr) == value:
                    setattr(obj, attr, previous)
            elif os.environ.get(key) == value:
                _set_env(key, None if previous is _MISSING else previous)

    def changed(self) -> dict:
        return {"flags": dict(self._saved_flags), "env": {k: (None if v is _MISSING else v)
                                                          for k, v in self._saved_env.items()}}

    def restore(self) -> None:
        """Put back every setting changed through this object; a setting an optimized pipeline still holds
        gets the value that pipeline set (later changes made outside a pipeline are undone)."""
        for path, value in list(self._saved_flags.items()):
            held = self._owned.get(("flag", path))
            obj, attr = _resolve(path)
            setattr(obj, attr, held[1] if held else value)
            if not held:
                del self._saved_flags[path]
        for name, value in list(self._saved_env.items()):
            held = self._owned.get(("env", name))
            target = held[1] if held else (None if value is _MISSING else value)
            _set_env(name, target)
            if not held:
                del self._saved_env[name]


GLOBAL_SETTINGS = GlobalSettings()
