"""Ctrl-C stops a run even when Python delivers it at a place that cannot raise.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a weakref callback
or a ``__del__`` (torch's compiler runs many) the exception is printed as "Exception ignored in ..." and
dropped, and the run goes on as if nothing happened. ``deliver_dropped_interrupts()`` installs an
unraisable hook that sends SIGINT to the process again instead, so the interrupt lands in ordinary code
and ends the run (one line, exit code 130, see ``run.interrupted``).
"""
from __future__ import annotations

import signal
import sys


def deliver_dropped_interrupts() -> None:
    """Install the hook (idempotent)."""
    previous = sys.unraisablehook
    if getattr(previous, "_sd3plugin", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # raised again at the next bytecode, where it can stop the run
            return
        previous(unraisable)

    hook._sd3plugin = True
    sys.unraisablehook = hook
