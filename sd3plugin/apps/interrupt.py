"""Ctrl-C stops a run even when Python delivers it at a place that cannot raise.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a weakref callback
or a ``__del__`` (torch's compiler runs many) the exception is printed as "Exception ignored in ..." and
dropped, and the run goes on as if nothing happened; a library that catches it and goes on does the same.
``deliver_dropped_interrupts()`` installs an unraisable hook that keeps such an interrupt (silently) instead,
and a SIGINT handler that raises KeyboardInterrupt as Python's does and remembers it; ``raise_if_dropped()`` raises it, and the
run calls it after every denoising step (``step_check``, a ``callback_on_step_end``) and between its stages,
so the run stops there (one line, exit code 130, see ``run.interrupted``).
"""
from __future__ import annotations

import sys

_DROPPED: list[bool] = []


def _on_sigint(signum, frame) -> None:
    """Python's own Ctrl-C handler, remembering the interrupt too: should a library catch the
    KeyboardInterrupt and go on, ``raise_if_dropped`` raises it again at the next step."""
    _DROPPED.append(True)
    raise KeyboardInterrupt


def deliver_dropped_interrupts() -> None:
    """Install the hook and the SIGINT handler (idempotent; the handler only where Python's default one is
    in place, so an application's own handler is kept)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    previous = sys.unraisablehook
    if getattr(previous, "_sd3plugin", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _DROPPED.append(True)
            return
        previous(unraisable)

    hook._sd3plugin = True
    sys.unraisablehook = hook


def raise_if_dropped() -> None:
    """Raise the KeyboardInterrupt that was dropped since the last call, if any."""
    if _DROPPED:
        _DROPPED.clear()
        raise KeyboardInterrupt


def step_check(pipe, step, timestep, callback_kwargs):
    """``callback_on_step_end``: a dropped Ctrl-C stops the pipeline after this step."""
    raise_if_dropped()
    return callback_kwargs
