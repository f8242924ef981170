"""One folder per run: where Hydra's files (``.hydra/``, ``run.log``) and the run's outputs go.

Hydra names a run's folder ``outputs/DATE/TIME`` (a multirun's ``multirun/DATE/TIME``) and reuses it when
two runs start in the same second, so one run's image and report replace the other's. Here the folder is
claimed before Hydra starts, with ``mkdir`` (atomic: exactly one process creates a name): the first run of a
second gets ``outputs/DATE/TIME``, the next ``outputs/DATE/TIME_2``, and so on. With ``output_dir=PATH`` the
run's Hydra files go there too (one folder per run, nothing written to the working folder); with ``-m``
and ``output_dir=PATH`` each job writes to ``PATH/N`` (its job number). An explicit ``hydra.run.dir`` /
``hydra.sweep.dir`` is used as given.
"""
from __future__ import annotations

import datetime
import itertools
import os
import shutil
from pathlib import Path

from ..errors import ConfigError, NotWritableError
from .writable import describe_error

# Hydra flags after which Hydra does not run the task (nothing to create).
NO_RUN_FLAGS = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--version", "--shell-completion", "-sc")

# The folder this process claimed (removed again if the run is interrupted before it wrote anything).
CLAIMED: list[Path] = []


def quote(value: str) -> str:
    """A path as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def claim(base: Path) -> Path:
    """Create ``base`` or, when it exists, the first free ``base_2``, ``base_3``... and return it."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        CLAIMED.append(candidate)
        return candidate
    raise AssertionError("unreachable")


def default_folder(root: str, now: datetime.datetime | None = None) -> Path:
    """Hydra's default folder name (``root/%Y-%m-%d/%H-%M-%S``)."""
    now = now or datetime.datetime.now()
    return Path(root) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")


def _given(argv: list[str], key: str) -> bool:
    return any(a.lstrip("+~").split("=", 1)[0] == key for a in argv)


def folder_overrides(argv: list[str], cfg, multirun: bool) -> list[str]:
    """``argv`` with the run folder settled: a claimed unique default folder, or output_dir's folder for
    Hydra's files. ``cfg`` is the config composed from argv's plain (non-sweep) overrides."""
    if any(a in NO_RUN_FLAGS for a in argv):
        return argv
    explicit_out = cfg.get("output_dir") if cfg is not None else None
    if multirun:
        if _given(argv, "hydra.sweep.dir"):
            return argv
        if cfg is not None and cfg.get("image_path"):
            raise ConfigError("image_path (--saved-image) names one file but -m runs several jobs that would "
                              "each write it; leave it out (each job writes its folder's image_00.png) or "
                              "sweep it (image_path=a.png,b.png)")
        if explicit_out:  # each job in output_dir/N (Hydra's job number), not all in one folder
            rest = [a for a in argv if a.lstrip("+").split("=", 1)[0] != "output_dir"]
            return rest + [f"hydra.sweep.dir={quote(explicit_out)}"]
        return argv + [f"hydra.sweep.dir={quote(_claim_default('multirun'))}"]
    if _given(argv, "hydra.run.dir"):
        return argv
    if explicit_out:
        return argv + [f"hydra.run.dir={quote(explicit_out)}"]
    return argv + [f"hydra.run.dir={quote(_claim_default('outputs'))}"]


def _claim_default(root: str) -> str:
    from .writable import check_folder

    base = default_folder(root)
    fix = "run from a folder you can write or set output_dir=PATH"
    check_folder(base, "the run folder", fix)  # a read-only working folder, a file named outputs...
    try:
        return str(claim(base))
    except OSError as exc:
        where = Path(os.getcwd())
        raise NotWritableError(f"cannot create the run folder {where / base}: the working folder {where} "
                               f"{describe_error(exc)}; {fix}") from None


def release_unused() -> tuple[list[Path], list[Path]]:
    """Remove the claimed folder if the run ended before writing anything of its own (only Hydra's files);
    returns (removed, kept)."""
    removed, kept = [], []
    for folder in CLAIMED:
        if not folder.is_dir():
            continue
        own = [p for p in folder.iterdir() if p.name not in (".hydra", "run.log")]
        if own:
            kept.append(folder.resolve())
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.resolve())
    return removed, kept
