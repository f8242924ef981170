"""Config groups and their presets (``group=name``).

``mode`` presets are YAML files in ``conf/mode/`` (each one a documented token string). The other groups
are generated from the one table that defines their choices, and registered in Hydra's ConfigStore:
``quant`` from ``QUANT_PRESETS``, ``memory_format`` from ``MEMORY_FORMATS``, ``dynamic`` from true/false,
``parallel`` from ``PARALLEL_PRESETS``, ``step_cache`` from ``STEP_CACHE_PRESETS``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .choices import MEMORY_FORMATS
from .parallel import PARALLEL_PRESETS, preset_node as parallel_preset_node
from .quant_presets import QUANT_PRESETS
from .step_cache import STEP_CACHE_PRESETS, preset_node as step_cache_preset_node

CONFIG_MODULE = "sd3plugin.conf"
GROUPS = ("mode", "memory_format", "dynamic", "quant", "parallel", "step_cache")

GENERATED_GROUPS: dict[str, dict[str, dict]] = {
    "quant": {name: {"type": name} for name in QUANT_PRESETS},
    "memory_format": {name: {"name": name} for name in MEMORY_FORMATS},
    "dynamic": {"false": {"enabled": False}, "true": {"enabled": True}},
    "parallel": {name: parallel_preset_node(name) for name in PARALLEL_PRESETS},
    "step_cache": {name: step_cache_preset_node(name) for name in STEP_CACHE_PRESETS},
}


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def register_generated_groups(cs) -> None:
    """Store every generated preset in the ConfigStore ``cs`` as ``group/name``."""
    for group, presets in GENERATED_GROUPS.items():
        for name, node in presets.items():
            cs.store(group=group, name=name, node=node)


def group_options(group: str) -> list[str]:
    """The preset names of ``group``: generated ones and YAML files in ``conf/<group>/``."""
    names = set(GENERATED_GROUPS.get(group, ()))
    names.update(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    return sorted(names)


def unknown_option(group: str, name) -> ConfigError:
    return ConfigError(f"unknown {group} option {name!r}; valid options: {', '.join(group_options(group))}"
                       + (" (or set any spec string with mode.spec=...)" if group == "mode" else ""))


def preset_node(group: str, name: str) -> DictConfig:
    """The keys preset ``name`` of ``group`` sets (a ConfigError lists the valid names)."""
    name = str(name)
    if name in GENERATED_GROUPS.get(group, {}):
        return OmegaConf.create(GENERATED_GROUPS[group][name])
    path = conf_dir() / group / f"{name}.yaml"
    if group not in GROUPS or not path.is_file():
        raise unknown_option(group, name)
    return OmegaConf.load(path)
