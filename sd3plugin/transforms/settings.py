"""Process-wide settings of a plan: the compile caches under ``cache_dir``, torch.backends flags of the mode
tokens, Dynamo's recompile limits. Recorded, so the pipeline's ``undo()`` puts back what was there."""
from __future__ import annotations

from .. import cache
from ..config.modes import torch_flags
from ..global_settings import GLOBAL_SETTINGS
from .base import Handle, Run

NAME = "settings"


def apply(run: Run) -> Handle:
    plan = run.plan
    with GLOBAL_SETTINGS.recording() as changes:
        info = cache.activate(plan.cache_dir, keep_coordesc=getattr(plan.cfg, "keep_coordesc", True)
                              if plan.cfg is not None else True)
        for path, value in torch_flags(plan.tokens, plan.device).items():
            GLOBAL_SETTINGS.set_flag(path, value)
        for name in ("dynamo.recompile_limit", "dynamo.cache_size_limit"):
            GLOBAL_SETTINGS.set_flag(name, max(plan.recompile_limit, 8))
    run.report.update(info)
    return Handle(NAME, lambda: GLOBAL_SETTINGS.revert(changes), {})
