"""docs/config.md lists every schema key with its type, default and kind (compile or run)."""
import re
from enum import Enum
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from sd3plugin.config import compose, compile_keys
from sd3plugin.config.help import format_value
from sd3plugin.config.presets import GROUPS, group_options
from sd3plugin.config.schema import leaf_fields
from sd3plugin.config.validate import ENV_SWITCHES, choices

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
FROM_PRESET = {"mode.description"}  # the default is the chosen preset's text


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _rows(title: str) -> dict[str, list[str]]:
    rows = {}
    for line in _section(title).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and re.fullmatch(r"`[^`]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _type(key, f) -> str:
    if key in choices():
        return "choice"
    text = str(f.type).replace("Optional[int]", "int or null").replace("Optional[str]", "str or null")
    return "dict" if text.startswith("dict") else text


def _default(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, Enum):
        value = value.value
    return format_value(value)


KEYS = dict(leaf_fields())


@pytest.fixture(scope="module")
def defaults():
    return compose()


@pytest.mark.parametrize("key", list(KEYS))
def test_every_key_is_documented_with_type_default_and_kind(key, defaults, monkeypatch):
    rows = _rows("Keys")
    assert key in rows, f"docs/config.md has no row for `{key}`"
    type_, default, kind, meaning = rows[key]
    assert type_ == _type(key, KEYS[key])
    assert kind == ("compile" if key in compile_keys() else "run")
    assert meaning
    if key in ENV_SWITCHES:
        assert default == f"`true` (`${ENV_SWITCHES[key]}`)"
    elif key == "cache_dir":
        assert "SD3PLUGIN_CACHE_DIR" in default
    elif key not in FROM_PRESET:
        assert default == f"`{_default(OmegaConf.select(defaults, key, throw_on_resolution_failure=False))}`"


def test_no_documented_key_is_missing_from_the_schema():
    assert set(_rows("Keys")) == set(KEYS)


def test_groups_and_presets_are_documented():
    rows = _rows("Groups (choose a preset with `group=name`)")
    assert set(rows) == set(GROUPS)
    for group in GROUPS:
        documented = set(re.findall(r"`([^`/]+)`", rows[group][0]))
        assert documented == set(group_options(group)), group


def test_environment_defaults_are_documented():
    rows = _rows("Environment variables")
    for key, var in ENV_SWITCHES.items():
        assert f"{var}=0" in rows and f"`{key}`" in rows[f"{var}=0"][0]
