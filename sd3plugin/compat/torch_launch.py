"""torch's elastic launcher, as ``torchrun --standalone`` uses it (``torch.distributed.launcher.api``; written
against torch 2.11-2.13): start N ranks of a program on this machine and learn which ranks failed, without
torchrun's own traceback when one does."""
from __future__ import annotations

import logging
import uuid


def launch_local_ranks(nproc: int, program: str, args: list[str]) -> dict[int, int]:
    """Run ``program args`` as ``nproc`` ranks on this machine (``--standalone``: a local rendezvous on a free
    port, no restarts); each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).
    Returns the exit code of every rank that failed ({} when all succeeded; a signal is its negative number)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its report of a failed rank
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, program)(*args)
    except ChildFailedError as exc:
        return {int(rank): int(failure.exitcode) for rank, failure in exc.failures.items()}
    return {}
