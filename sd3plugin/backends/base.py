"""What every backend gets (the Plan) and must provide (availability, compile, undo)."""
from __future__ import annotations

from ..plan import Plan


# What every backend gets: the plan of the run (sd3plugin.plan.Plan).
CompilePlan = Plan


def transformer_blocks(transformer) -> list:
    """The repeated blocks of an SD3/SD3.5 transformer (JointTransformerBlock), for regional compile."""
    return list(getattr(transformer, "transformer_blocks", []))


class Backend:
    name = "?"

    def availability(self, plan: CompilePlan) -> tuple[bool, str]:
        """(usable, reason): whether this backend can run here, and why (not)."""
        return True, "always available"

    def compile(self, transformer, plan: CompilePlan) -> dict:
        """Compile ``transformer`` in place; return report info (at least ``compiled_modules``)."""
        return {"compiled_modules": []}

    def undo(self, transformer) -> None:
        """Put ``transformer`` back exactly as it was before ``compile``."""
