"""``sd3plugin-cache``: warm, pack, install, verify and inspect compile caches; ``doctor``.

Each subcommand lives in its own module ``sd3plugin.cli.cmd_<name>`` with two functions:
``add_parser(subparsers)`` (argparse) and ``run(args) -> int`` (exit code). Trailing ``key=value``
arguments are Hydra overrides of the same config as ``sd3plugin-run``.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import sys
import traceback

from sd3plugin.cache.errors import CacheError
from sd3plugin.errors import ConfigError

from .exit_codes import EXIT

COMMANDS = ["doctor", "warm", "pack", "install", "ls", "info", "prune", "clear", "verify", "keygen"]


def _load(name: str):
    try:
        return importlib.import_module(f"sd3plugin.cli.cmd_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"sd3plugin.cli.cmd_{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd3plugin-cache",
        description="Pre-warm, pack, ship and install sd3plugin compile caches. "
                    "Trailing key=value arguments are Hydra overrides (as for sd3plugin-run).",
        epilog="exit codes: " + ", ".join(f"{v}={k}" for k, v in EXIT.items()))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        if mod is not None:
            p = mod.add_parser(sub)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT["usage"]
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like key=value)")
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        _fail(args, f"sd3plugin-cache {args.command}: {exc}", EXIT["usage"])
        return EXIT["usage"]
    except CacheError as exc:
        code = EXIT.get(exc.exit_name, EXIT["error"])
        _fail(args, f"sd3plugin-cache {args.command}: {exc}", code)
        return code
    except KeyboardInterrupt:
        _fail(args, f"sd3plugin-cache {args.command}: interrupted (the cache is as it was, or is recovered by "
                    "the next command)", 130)
        return 130
    except OSError as exc:  # e.g. the disk filled up or a folder is read-only outside the checked steps
        code = EXIT["cannot_write"] if exc.errno in _WRITE_ERRNOS else EXIT["error"]
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(args, f"sd3plugin-cache {args.command}: {exc.strerror or exc}{where}"
                    + ("; free some space or choose another --cache-dir" if code == EXIT["cannot_write"] else ""), code)
        _debug()
        return code
    except Exception as exc:  # never a traceback: one line, exit 1 (SD3PLUGIN_DEBUG=1 shows the traceback)
        _fail(args, f"sd3plugin-cache {args.command}: unexpected error: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300] if str(exc) else ''} (SD3PLUGIN_DEBUG=1 shows the traceback)",
              EXIT["error"])
        _debug()
        return EXIT["error"]


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _debug() -> None:
    if os.environ.get("SD3PLUGIN_DEBUG"):
        traceback.print_exc()


def one_line(message: str) -> str:
    """``message`` as one printable line: control characters, line separators and lone surrogates (which a
    hostile archive may put into a name or value) are shown escaped, never printed."""
    message = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], message)
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _fail(args, message: str, code: int) -> None:
    message = one_line(message)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
