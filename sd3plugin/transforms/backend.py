"""Pick the backend of the plan (``auto`` says why); an unavailable one falls back to eager or raises."""
from __future__ import annotations

import logging

from ..backends import resolve_backend
from ..errors import BackendUnavailableError
from .base import Run

log = logging.getLogger("sd3plugin")
NAME = "backend"


def apply(run: Run) -> None:
    plan, report = run.plan, run.report
    try:
        backend, reason = resolve_backend(plan.backend, plan)
    except BackendUnavailableError as exc:
        if plan.on_error == "raise":
            raise
        backend, reason = resolve_backend("eager", plan)[0], f"fallback to eager: {exc}"
        report["error"] = str(exc)
        log.warning("sd3plugin: %s; running eagerly (on_error=fallback)", exc)
    run.backend = backend
    report["backend"], report["backend_reason"] = backend.name, reason
    log.info("sd3plugin: backend %s (%s)", backend.name, reason)
