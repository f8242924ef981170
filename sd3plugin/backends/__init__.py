"""Backend registry: a backend is a small module behind one registered name.

``register_backend("name")`` decorates a Backend subclass; ``get_backend(name)`` returns an instance;
``resolve_backend("auto", plan)`` returns the chosen backend and the reason, in one line.
"""
from __future__ import annotations

from ..config import schema as config_schema  # the one table of backend names: config.schema.BACKENDS
from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, CompilePlan

_REGISTRY: dict[str, type[Backend]] = {}
_ADDED: set[str] = set()  # plugin names this registry added to the config's table


def register_backend(name: str):
    """Register a Backend class as ``backend=name``. A name outside ``config.schema.BACKENDS`` (a plugin's
    backend) is added to that table, so that the config accepts it."""
    if name == "auto":
        raise ValueError("'auto' is not a backend: it picks one of the registered backends")

    def deco(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        if name not in config_schema.BACKENDS:
            config_schema.BACKENDS = (*config_schema.BACKENDS, name)
            _ADDED.add(name)
        return cls
    return deco


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)
    if name in _ADDED:
        _ADDED.discard(name)
        config_schema.BACKENDS = tuple(b for b in config_schema.BACKENDS if b != name)


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; registered backends: auto, {', '.join(_REGISTRY)}") \
            from None


def resolve_backend(name: str, plan: CompilePlan) -> tuple[Backend, str]:
    """Pick the backend for ``name`` (``auto`` included) and say why."""
    if name != "auto":
        backend = get_backend(name)
        ok, why = backend.availability(plan)
        if not ok:
            raise BackendUnavailableError(f"backend={name!r} cannot run here: {why}")
        return backend, f"requested backend={name}"
    nexfort_backend = get_backend("nexfort")
    ok, why_not_nexfort = nexfort_backend.availability(plan)
    if ok:
        return nexfort_backend, f"auto: nexfort imports and matches torch/triton here ({why_not_nexfort})"
    inductor_backend = get_backend("inductor")
    ok, why = inductor_backend.availability(plan)
    if ok:
        return inductor_backend, f"auto: inductor, because nexfort is not usable here: {why_not_nexfort}"
    return get_backend("eager"), f"auto: eager, because nexfort ({why_not_nexfort}) and inductor ({why}) are not"


from . import eager, inductor, nexfort  # noqa: E402,F401  (register the built-in backends)

if _ADDED or set(config_schema.BACKENDS) - {"auto"} != set(_REGISTRY):  # built-ins: exactly the table's names
    raise ImportError(f"built-in backends {sorted(_REGISTRY)} and config.schema.BACKENDS "
                      f"{config_schema.BACKENDS} disagree: register them by the table's names")

__all__ = ["Backend", "CompilePlan", "register_backend", "unregister_backend", "get_backend",
           "resolve_backend", "backend_names"]
