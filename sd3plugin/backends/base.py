"""What every backend gets (a CompilePlan) and must provide (availability, compile, undo)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompilePlan:
    """Everything a backend needs, derived from the composed config."""

    mode_spec: str
    tokens: tuple[str, ...]
    device: str                  # "cpu" or "cuda"
    dynamic: bool
    recompile_limit: int
    memory_format: str
    cache_dir: str
    options: dict = field(default_factory=dict)  # backend_options from the config, passed as they are


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
