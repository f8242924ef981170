"""The nexfort backend through onediff (filled in by the nexfort issue)."""
from __future__ import annotations

from . import register_backend
from .base import Backend, CompilePlan


@register_backend("nexfort")
class NexfortBackend(Backend):
    def availability(self, plan: CompilePlan) -> tuple[bool, str]:
        return False, "nexfort is not installed (pip install '.[nexfort]' on the torch 2.4 stack)"
