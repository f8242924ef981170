"""Compose and validate configs outside a Hydra app (Python API, hook, CLI pre-checks).

``compose(cfg=None, overrides=())`` returns a validated DictConfig. Hydra's own errors (unknown key,
unknown group option, wrong type) become one ``ConfigError`` naming the bad value and the valid ones.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from . import schema
from .modes import parse_mode

CONFIG_MODULE = "sd3plugin.conf"
GROUPS = ("mode", "memory_format", "dynamic", "quant")


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@contextmanager
def _hydra_context():
    """Initialise Hydra on our config module, keeping any Hydra already initialised (e.g. in an app)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    schema.register()
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            yield
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def _explain(exc: Exception, overrides: list[str]) -> str:
    msg = str(exc)
    for group in GROUPS:
        if f"'{group}/" in msg or f"in '{group}'" in msg or f"{group}=" in msg and "Could not find" in msg:
            bad = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == group), "?")
            return (f"unknown {group} option {bad!r}; valid options: {', '.join(group_options(group))}"
                    + (" (or set any spec string with mode.spec=...)" if group == "mode" else ""))
    if "not in struct" in msg or "Could not override" in msg or "Key '" in msg and "not" in msg:
        key = msg.split("'")[1] if "'" in msg else "?"
        valid = ", ".join(k for k in schema.SD3PluginConfig.__dataclass_fields__)
        return f"unknown config key {key!r}; valid keys: {valid}"
    cause = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
    if cause is not None:
        lines += [line.strip() for line in str(cause).strip().splitlines()[:1] if line.strip()]
    return "invalid config: " + "; ".join(lines)


def normalize_overrides(overrides: Iterable[str]) -> list[str]:
    """Quote boolean-looking group choices (``dynamic=true``): Hydra would parse them as bools."""
    out = []
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep and key in GROUPS and value.lower() in ("true", "false"):
            o = f"{key}='{value.lower()}'"
        out.append(o)
    return out


def compose(cfg: DictConfig | Mapping | str | os.PathLike | None = None,
            overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the config: defaults, then ``cfg`` (a mapping, DictConfig or YAML path), then overrides."""
    from hydra import compose as hydra_compose

    overrides = normalize_overrides(overrides)
    if isinstance(cfg, DictConfig) and not overrides and "mode" in cfg and "spec" in cfg.get("mode", {}):
        validate(cfg)
        return cfg
    try:
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
                    from hydra._internal.config_loader_impl import ConfigLoaderImpl
                    from hydra.core.override_parser.overrides_parser import OverridesParser

                    OmegaConf.set_struct(base, True)
                    ConfigLoaderImpl._apply_overrides_to_config(
                        OverridesParser.create().parse_overrides(rest), base)
    except ConfigError:
        raise
    except Exception as exc:  # hydra / omegaconf composition errors
        raise ConfigError(_explain(exc, overrides)) from None
    validate(base)
    return base


def _load_user_cfg(cfg) -> DictConfig:
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML file path")
        return OmegaConf.load(path)
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
        if isinstance(user.get(group), str):
            name = user.pop(group)
            path = conf_dir() / group / f"{name}.yaml"
            if not path.is_file():
                raise ConfigError(f"unknown {group} option {name!r}; valid options: "
                                  f"{', '.join(group_options(group))}")
            base[group] = OmegaConf.merge(base[group], OmegaConf.load(path))
    return OmegaConf.merge(base, user)


def validate(cfg: DictConfig) -> DictConfig:
    """Check values Hydra's types cannot: choices, mode tokens, shapes. Raises ConfigError."""
    def choice(key, value, valid):
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")

    choice("backend", cfg.backend, schema.BACKENDS)
    choice("on_error", cfg.on_error, schema.ON_ERROR)
    choice("attention", cfg.attention, schema.ATTENTION)
    choice("device", cfg.device, schema.DEVICES)
    choice("dtype", cfg.dtype, schema.DTYPES)
    choice("memory_format", cfg.memory_format.name, schema.MEMORY_FORMATS)
    tokens = parse_mode(cfg.mode.spec)
    from ..quant import validate_quant

    validate_quant(cfg.quant, tokens, device=cfg.device, dtype=cfg.dtype)
    for key in ("steps", "num_images"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be at least 1")
    for key in ("height", "width"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive number of pixels")
    from ..models import check_resolution

    check_resolution(cfg.model, cfg.height, cfg.width)
    return cfg


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=2, sort_keys=True)
