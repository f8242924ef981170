"""Hydra internals sd3plugin relies on, in one place (checked by ``tests/test_compat_hydra.py``).

- ``ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)`` (private): applies command-line
  overrides (``a.b=1``, ``+new=1``, ``~key``) to an already composed config, with Hydra's semantics.
  ``compose(cfg=..., overrides=...)`` uses it to put overrides on top of a user's YAML or mapping.
- ``GlobalHydra.instance().hydra`` (an attribute, not an API): saved and restored around a compose so
  that composing inside a running Hydra app leaves the app's Hydra as it was.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable, Iterator

PRIVATE_APPLY = "hydra._internal.config_loader_impl.ConfigLoaderImpl._apply_overrides_to_config"
APPLY_PARAMETERS = ("overrides", "cfg")


def parse_overrides(overrides: Iterable[str]) -> list:
    """Hydra's parsed ``Override`` objects of ``overrides`` (public API)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _apply_function():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    return ConfigLoaderImpl._apply_overrides_to_config


def apply_overrides(cfg, overrides: Iterable[str]) -> None:
    """Apply command-line ``overrides`` to the composed DictConfig ``cfg`` in place (struct mode set)."""
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, True)
    _apply_function()(parse_overrides(overrides), cfg)


@contextmanager
def isolated_global_hydra() -> Iterator[None]:
    """Clear Hydra's global state for the block, then put back whatever was initialised before it."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def check() -> list[str]:
    """What the installed Hydra lacks of the above (empty when everything is there)."""
    problems = []
    try:
        fn = _apply_function()
    except (ImportError, AttributeError) as exc:
        return [f"{PRIVATE_APPLY} is gone ({exc}); compose(cfg, overrides) needs a replacement"]
    params = tuple(inspect.signature(fn).parameters)
    if params != APPLY_PARAMETERS:
        problems.append(f"{PRIVATE_APPLY} takes {params}, expected {APPLY_PARAMETERS}")
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not hasattr(gh, "hydra"):
        problems.append("GlobalHydra.instance().hydra is gone; isolated_global_hydra() needs a replacement")
    return problems
