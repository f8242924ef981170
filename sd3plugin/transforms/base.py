"""What every transform returns: a ``Handle`` that knows how to remove what it did.

A transform is a module with ``NAME`` and ``apply(run) -> Handle | None``; ``run`` (``Run``) carries the
target (pipeline or transformer), the plan and the report being built. ``optimize()`` applies the
transforms in order and keeps their handles on the transformer; ``undo()`` removes them in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Handle:
    """One change to a model: its name, what it reports, and how to undo it."""

    name: str
    undo: Callable[[], None] = lambda: None
    report: dict = field(default_factory=dict)
    removed: bool = False

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            self.undo()


@dataclass
class Run:
    """The state one ``optimize()`` call passes from transform to transform."""

    target: Any                 # what the user handed in: a pipeline or the transformer itself
    transformer: Any
    plan: Any                   # sd3plugin.plan.Plan
    report: dict
    backend: Any = None         # the resolved Backend (set by the backend transform)
    handles: list = field(default_factory=list)

    @property
    def vae(self):
        return getattr(self.target, "vae", None) if self.target is not self.transformer else None

    @property
    def compiling(self) -> bool:
        return self.backend is not None and self.backend.name != "eager"
