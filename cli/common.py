"""Shared pieces of the ``sd3plugin-cache`` subcommands: common flags, cache dir, output, confirmation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sd3plugin.cache.lock import DEFAULT_TIMEOUT_S
from sd3plugin.errors import ConfigError


CACHE_DIR_HELP = "cache dir (default: the config's cache_dir, i.e. $SD3PLUGIN_CACHE_DIR or ~/.cache/sd3plugin)"


def add_common(p, lock: bool = False, overrides: bool = True, cache_dir_help: str = CACHE_DIR_HELP):
    """The flags every subcommand shares: ``--json`` and ``--cache-dir`` (so one set of flags works with any
    command); ``--lock-timeout`` where the command locks the cache dir; trailing overrides where it reads
    the config."""
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--cache-dir", metavar="DIR", help=cache_dir_help)
    if lock:
        p.add_argument("--lock-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"wait this long for another process's lock on the cache dir (default {DEFAULT_TIMEOUT_S:g})")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="OVERRIDES", help="Hydra overrides, key=value")
    return p


def compose_args(args):
    """The composed config of the command's overrides, with ``--cache-dir`` applied."""
    from sd3plugin.config import compose

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not an override (key=value); see sd3plugin-cache {args.command} -h")
    cfg = compose(None, args.overrides)
    if getattr(args, "cache_dir", None):
        cfg.cache_dir = str(Path(args.cache_dir).expanduser().absolute())
    return cfg


def cache_root(args) -> Path:
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir).expanduser().absolute()
    return Path(compose_args(args).cache_dir).expanduser().absolute()


def emit(args, result: dict, text: str | None) -> None:
    """``result`` as JSON with --json (or when there is no ``text``), else ``text``. JSON is written in
    pieces, never built whole in memory."""
    if getattr(args, "json", False) or text is None:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def confirm(args, question: str) -> bool:
    """True with --yes or a 'y' answer on a terminal; a ConfigError (exit 2) when nobody can answer."""
    if getattr(args, "yes", False):
        return True
    if getattr(args, "json", False) or not sys.stdin.isatty():
        raise ConfigError(f"{question.rstrip('?')}: needs confirmation; pass --yes (no terminal to ask)")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")
