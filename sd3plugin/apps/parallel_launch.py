"""``sd3plugin-run parallel=...``: start one process per GPU (torch.distributed.run), or print the command.

Before anything loads: the config composes (a mistake is one line, exit 2), the machine has the world size's
CUDA GPUs and xfuser imports (else one line, exit 2), each plugin change xDiT's path does not keep is named
(one ``note:`` line each). Then this process starts the ranks as ``python -m torch.distributed.run
--standalone --nproc-per-node=N -m sd3plugin.apps.run ARGS...`` does (torch's elastic launcher, in this
process) and waits for them: each rank runs sd3plugin-run again with the same arguments and takes the parallel
path (``parallel_run.generate_parallel``). The exit code is the first failing rank's.
"""
from __future__ import annotations

import shlex
import sys

from ..config.parallel import in_rank
from ..errors import ConfigError

_SKIP_FLAGS = ("--help", "-h", "--cfg", "-c", "--info", "-i", "--hydra-help", "-m", "--multirun")


def launch_command(argv: list[str], nproc: int, python: str | None = None) -> list[str]:
    """The command that runs sd3plugin-run ``argv`` as ``nproc`` ranks on this machine."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "sd3plugin.apps.run", *argv]


def mentions_parallel(argv: list[str]) -> bool:
    return any(a.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "parallel" for a in argv if "=" in a)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(argv: list[str]):
    """``(cfg, command)`` for a parallel run of sd3plugin-run ``argv``, or None when there is nothing to
    launch (no parallel preset, a Hydra flag that only prints, or already inside a rank)."""
    from ..config import compose
    from ..config.parallel import is_parallel, world_size
    from .run import prepare_argv, split_overrides

    if in_rank() or any(a in _SKIP_FLAGS for a in argv) or not mentions_parallel(argv):
        return None
    overrides, _ = split_overrides(prepare_argv(argv))
    cfg = compose(None, overrides)
    if not is_parallel(cfg):
        return None
    rank_argv = [a for a in argv if a.split("=", 1)[0].lstrip("+~") != "parallel.launch"]
    return cfg, launch_command(rank_argv, world_size(cfg.parallel))


def check_machine(cfg) -> None:
    """Enough GPUs, then xfuser: ConfigError with the fix."""
    from ..compat import xfuser as xf
    from ..config.parallel import INSTALL_HINT, check_parallel_gpus, label

    check_parallel_gpus(cfg, gpu_count())
    why = xf.unavailable()
    if why:
        raise ConfigError(f"{label(cfg.parallel)} runs through xDiT but {why}; {INSTALL_HINT}")


def maybe_launch(argv: list[str]) -> None:
    """Return when sd3plugin-run ``argv`` is not a parallel run to start; otherwise print the command
    (``parallel.launch=print``, exit 0) or replace this process with it. Errors: one line, exit 2."""
    from ..config.parallel import adjustments, world_size

    try:
        planned = plan_launch(argv)
        if planned is None:
            return
        cfg, cmd = planned
        if str(cfg.parallel.launch) == "print":
            print(shlex.join(cmd), flush=True)
            sys.exit(0)
        check_machine(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for adj in adjustments(cfg):
        print(f"note: {adj.line}", file=sys.stderr)
    nproc = world_size(cfg.parallel)
    print(f"sd3plugin-run: starting {nproc} ranks, as: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    sys.exit(run_ranks(nproc, cmd[5:]))


def run_ranks(nproc: int, args: list[str], program: str | None = None) -> int:
    """Run ``program args`` (default: this Python) as ``nproc`` ranks; the exit code for the launcher. A rank's
    own error is its one line (rank 0 prints a ConfigError); a failure without one gets a line here."""
    from ..compat.torch_launch import launch_local_ranks

    failures = launch_local_ranks(nproc, program or sys.executable, args)
    if not failures:
        return 0
    rank, code = (0, failures[0]) if 0 in failures else min(failures.items())
    if code != 2:  # 2: a ConfigError, already said by rank 0
        how = f"was stopped by signal {-code}" if code < 0 else f"ended with exit code {code}"
        print(f"error: rank {rank} of {nproc} {how}; its output is above", file=sys.stderr)
    return code if code > 0 else 1
