"""``--help`` of the apps, generated from the schema: groups and their presets, every key with its default
and one line (``key_docs.key_doc``: value lists read from the choice tables), the seed-style flags (``legacy.FLAG_DOCS``) and Hydra's flags."""
from __future__ import annotations

import textwrap

from omegaconf import OmegaConf

from .key_docs import key_doc
from .legacy import FLAG_DOCS
from .presets import GROUPS, group_options
from .schema import leaf_fields

WIDTH = 110
KEY_COLUMN = 30

# The key whose value names a group's chosen preset.
_PRESET_KEY = {"mode": "mode.name", "memory_format": "memory_format.name", "dynamic": "dynamic.enabled",
               "quant": "quant.type", "parallel": "parallel.name",
               "step_cache": "step_cache.name"}

HYDRA_FLAGS = [
    ("--cfg job", "print the composed config and exit (add --resolve for the values of ${...})"),
    ("-m, --multirun", "sweep comma-separated values, one run each (mode=default,max-speed)"),
    ("--hydra-help", "Hydra's own help"),
]


def format_value(value) -> str:
    """A default as the help and docs/config.md write it (true, null, \"\")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if value == "":
        return '""'
    return str(value)


def _default(cfg, key: str) -> str:
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # an interpolation that cannot resolve here: show it as written
        value = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return format_value(getattr(value, "value", value))


def _row(name: str, text: str) -> str:
    """``  name    text`` with the text wrapped in its column (a long name gets a line of its own)."""
    indent = " " * KEY_COLUMN
    if len(name) < KEY_COLUMN - 2:
        return textwrap.fill(text, WIDTH, initial_indent=f"  {name:<{KEY_COLUMN - 2}}", subsequent_indent=indent,
                             break_on_hyphens=False)
    return f"  {name}\n" + textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                                         break_on_hyphens=False)


def group_lines(cfg) -> list[str]:
    lines = []
    for group in GROUPS:
        chosen = _default(cfg, _PRESET_KEY[group])
        names = [f"{n}*" if n == chosen else n for n in group_options(group)]
        lines.append(_row(group, ", ".join(names)))
    return lines


def key_lines(cfg) -> list[str]:
    return [_row(key, f"{key_doc(key)} [default: {_default(cfg, key)}]") for key, _ in leaf_fields()]


def flag_lines(bench: bool) -> list[str]:
    return [_row(f"{flag} {value}", doc) for flag, (value, doc) in FLAG_DOCS.items()
            if bench or "sd3plugin-bench only" not in doc]


def cli_help(prog: str, summary: str, extra: list[tuple[str, list[tuple[str, str]]]] = (),
             bench: bool = False) -> str:
    """The whole --help text of ``prog``; ``extra``: more sections as (title, [(name, text)])."""
    from .compose import compose

    cfg = compose()
    parts = [f"usage: {prog} [KEY=VALUE ...] [GROUP=PRESET ...] [seed-style flags] [--cfg job] [-m]", "",
             textwrap.fill(summary, WIDTH), "",
             "groups (GROUP=PRESET; * marks the default):", *group_lines(cfg), "",
             "keys (KEY=VALUE):", *key_lines(cfg), ""]
    for title, rows in extra:
        parts += [f"{title}:", *(_row(name, text) for name, text in rows), ""]
    parts += ["seed-style flags (onediff's text_to_image_sd3.py; translated to the keys above):",
              *flag_lines(bench), "",
              "Hydra:", *(_row(name, text) for name, text in HYDRA_FLAGS), "",
              "Docs: docs/config.md (every key), docs/modes.md (mode tokens), docs/onediff-users.md (seed flags)."]
    return "\n".join(parts)
