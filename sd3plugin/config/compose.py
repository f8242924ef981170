"""Compose and validate configs outside a Hydra app (Python API, hook, CLI pre-checks).

``compose(cfg=None, overrides=())`` returns a validated DictConfig. Hydra's own errors (unknown key,
unknown group option, wrong type) become one ``ConfigError`` naming the bad value and the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from ..compat.hydra import apply_overrides, isolated_global_hydra, parse_overrides
from ..errors import ConfigError
from . import schema
from .presets import CONFIG_MODULE, GROUPS, conf_dir, group_options, preset_node, unknown_option  # noqa: F401
from .validate import check_choice, choices, validate

MAX_CONFIG_BYTES = 16 * 2**20  # a YAML config file

__all__ = ["compose", "validate", "normalize_overrides", "group_options", "to_json", "GROUPS"]


@contextmanager
def _hydra_context():
    """Initialise Hydra on our config module, keeping any Hydra already initialised (e.g. in an app)."""
    from hydra import initialize_config_module

    schema.register()
    with isolated_global_hydra():
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            yield


def _valid_keys() -> str:
    return ", ".join(schema.top_level_keys())


def _explain(exc: Exception, overrides: list[str]) -> str:
    msg = str(exc)
    for group in GROUPS:
        if f"'{group}/" in msg or f"in '{group}'" in msg or f"{group}=" in msg and "Could not find" in msg:
            bad = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == group), "?")
            return str(unknown_option(group, bad.strip("'\"")))
    cause = exc.__cause__ or exc.__context__
    for candidate in (exc, cause):
        bad_choice = _bad_choice(candidate)
        if bad_choice:
            return bad_choice
    if "not in struct" in msg or "Could not override" in msg or "Key '" in msg and "not" in msg:
        key = msg.split("'")[1] if "'" in msg else "?"
        return f"unknown config key {key!r}; valid keys: {_valid_keys()}"
    lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
    if cause is not None:
        lines += [line.strip() for line in str(cause).strip().splitlines()[:1] if line.strip()]
    return "invalid config: " + "; ".join(lines)


def _bad_choice(exc) -> str | None:
    """An enum key given a value outside its table: the same message validate() gives."""
    key = getattr(exc, "full_key", None)
    valid = choices().get(str(key)) if key else None
    if valid is None or "Invalid value '" not in str(exc):
        return None
    value = str(exc).split("Invalid value '", 1)[1].split("'", 1)[0]
    try:
        check_choice(str(key), value, valid)
    except ConfigError as err:
        return str(err)
    return None


def check_added_keys(overrides: Iterable[str]) -> None:
    """``+key=value`` adds a key in Hydra even to a typed config: refuse keys the schema does not have
    (``+stepz=4``). Keys below a free-form mapping (``+backend_options.x=1``) and ``hydra.*`` are fine."""
    for override in parse_overrides(overrides):
        if not (override.is_add() or override.is_force_add()):
            continue
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra.") or schema.is_known_key(key):
            continue
        raise ConfigError(f"unknown config key {key!r}; valid keys: {_valid_keys()}")


def normalize_overrides(overrides: Iterable[str]) -> list[str]:
    """Quote boolean-looking group choices (``dynamic=true``): Hydra would parse them as bools."""
    out = []
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep and key in GROUPS and value.lower() in ("true", "false"):
            o = f"{key}='{value.lower()}'"
        out.append(o)
    return out


def is_complete(cfg) -> bool:
    """Whether ``cfg`` (a mapping or DictConfig) needs no composition: every key of the schema is there and
    every group is given as its keys, not as a preset name (``mode: max-speed`` needs Hydra's defaults)."""
    if not isinstance(cfg, (Mapping, DictConfig)):
        return False
    keys = set(cfg.keys())
    groups = [f.name for f in dataclasses.fields(schema.SD3PluginConfig) if f.metadata.get("group")]
    return (set(schema.top_level_keys()) <= keys and keys <= set(schema.top_level_keys()) | {"hydra"}
            and all(isinstance(cfg[g], (Mapping, DictConfig)) for g in groups)
            and "spec" in cfg["mode"] and "name" in cfg["mode"])


def _typed(cfg) -> DictConfig:
    """A complete mapping checked against the schema's types, without Hydra (``is_complete``)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
        plain.pop("hydra", None)
        typed = OmegaConf.merge(OmegaConf.structured(schema.SD3PluginConfig), plain)
    except Exception as exc:  # omegaconf type/key errors
        raise ConfigError(_explain(exc, [])) from None
    OmegaConf.set_struct(typed, True)
    return typed


def compose(cfg: DictConfig | Mapping | str | os.PathLike | None = None,
            overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the config: defaults, then ``cfg`` (a mapping, DictConfig or YAML path), then overrides.

    Hydra composes (and is imported) only when there is something to compose: overrides, preset names or
    missing keys. A composed config (``report(pipe)["config"]``, a hook's config) is only validated; a
    complete plain mapping is checked against the schema's types with OmegaConf alone.
    """
    overrides = normalize_overrides(overrides)
    if isinstance(cfg, DictConfig) and not overrides and "mode" in cfg and "spec" in cfg.get("mode", {}):
        validate(cfg)
        return cfg
    if not overrides and isinstance(cfg, Mapping) and is_complete(cfg):
        typed = _typed(cfg)
        validate(typed)
        return typed
    from hydra import compose as hydra_compose

    try:
        check_added_keys(overrides)
        with _hydra_context():
            base = hydra_compose(config_name="config", overrides=overrides if cfg is None else [])
            if cfg is not None:
                user = _load_user_cfg(cfg)
                base = _merge_user(base, user)
                groups = {o.split("=", 1)[0]: o.split("=", 1)[1].strip("'\"") for o in overrides
                          if o.split("=", 1)[0] in GROUPS and "=" in o}
                rest = [o for o in overrides if o.split("=", 1)[0] not in groups]
                if groups:
                    base = _merge_user(base, OmegaConf.create(groups))
                if rest:
                    apply_overrides(base, rest)
    except ConfigError:
        raise
    except Exception as exc:  # hydra / omegaconf composition errors
        raise ConfigError(_explain(exc, overrides)) from None
    validate(base)
    return base


def _load_user_cfg(cfg) -> DictConfig:
    from ..regular_file import read_regular  # config imports only config/errors/compat at import time

    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg).expanduser()
        try:  # non-blocking + fstat: a FIFO or device given as the config is refused, never waited on
            data = read_regular(path, MAX_CONFIG_BYTES)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML file path") from None
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {str(path)!r}: {exc.strerror}; give a YAML file "
                              "path") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} is over {MAX_CONFIG_BYTES} bytes; give a YAML config")
        try:
            return OmegaConf.create(data.decode("utf-8") or "{}")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; give a YAML file path") from None
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise ConfigError(f"cfg must be a mapping, DictConfig or YAML path, got {type(cfg).__name__}")


def _merge_user(base: DictConfig, user: DictConfig) -> DictConfig:
    """Merge a user config; a group given as a string (``mode: max-autotune``) selects that preset."""
    user = OmegaConf.to_container(user, resolve=False)
    user.pop("hydra", None)
    user.pop("defaults", None)
    for group in GROUPS:
        if isinstance(user.get(group), bool):  # ``dynamic: true`` in YAML names the preset "true"
            user[group] = str(user[group]).lower()
        if isinstance(user.get(group), str):
            base[group] = OmegaConf.merge(base[group], preset_node(group, user.pop(group)))
    return OmegaConf.merge(base, user)


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), indent=2, sort_keys=True)
