"""Known harmless warnings of the libraries a run imports go to the run's log file, not the terminal.

Every ``sd3plugin-run`` / ``sd3plugin-bench`` printed a screenful of warnings that say nothing about the run
(optional torchao kernels this torch cannot load, transformers falling back to its PIL image processor
without torchvision...). ``route_known_warnings()`` puts a filter on the terminal handlers (the root
logger's, and the own handlers of transformers, diffusers, torch and torchao): a record matching
``KNOWN_HARMLESS`` is written to the log file handlers of the root logger (Hydra's ``run.log`` in the run
folder) instead. Python ``warnings`` matching the table take the same way. Anything not in the table
reaches the terminal as before; without a log file nothing is hidden.
"""
from __future__ import annotations

import logging
import re
import warnings

# (logger name or prefix, message pattern, why it is harmless)
KNOWN_HARMLESS: tuple[tuple[str, str, str], ...] = (
    ("torchao", r"Failed to load .*\.so", "optional torchao kernels built for another torch / GPU"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
     "torchao registers its enums the old way; torch accepts it"),
    ("diffusers", r"Unable to import `torchao` Tensor objects",
     "only matters for checkpoints serialized with torchao"),
    ("diffusers", r"should be kept in float32: \[\]", "no module is kept in float32: nothing is affected"),
    ("transformers", r"requires torchvision \(not installed\); falling back",
     "the PIL image processor is used; SD3 pipelines have none"),
    ("torchvision", r"Failed to load image Python extension", "torchvision's image codecs; unused"),
    ("torchvision", r"(?s)torchvision.* Beta", "torchvision API notice; unused"),
)
_PATTERNS = [(name, re.compile(pattern)) for name, pattern, _ in KNOWN_HARMLESS]
LIBRARY_LOGGERS = ("transformers", "diffusers", "torch", "torchao")


def is_known_harmless(logger_name: str, message: str) -> bool:
    return any((logger_name == name or logger_name.startswith(name + ".")) and pattern.search(message)
               for name, pattern in _PATTERNS)


def _log_files() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


class _ToLogFile(logging.Filter):
    """On a terminal handler: a known harmless record goes to the log files instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if not is_known_harmless(record.name, message):
            return True
        files = _log_files()
        if not files:
            return True
        if not _reaches_root(record.name) and not getattr(record, "_sd3plugin_logged", False):
            record._sd3plugin_logged = True  # several terminal handlers see it: into the files once
            for handler in files:
                if record.levelno >= handler.level:
                    handler.handle(record)
        return False


def _reaches_root(name: str) -> bool:
    """Whether a record of logger ``name`` propagates up to the root logger's handlers."""
    logger = logging.getLogger(name)
    while logger is not None and logger is not logging.getLogger():
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


_FILTER = _ToLogFile()


def _terminal_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def route_known_warnings() -> None:
    """Install the routing (idempotent): on the terminal handlers there now, on those transformers and
    diffusers create on import, and for Python warnings."""
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):  # they add their handlers here
        try:
            __import__(module)
        except Exception:  # not installed or broken: nothing of theirs to route
            pass
    for handler in _terminal_handlers():
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    if getattr(warnings.showwarning, "_sd3plugin", False):
        return
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        module = "torchvision" if "torchvision" in str(filename) else ""
        if module and is_known_harmless(module, text) and _log_files():
            logging.getLogger(f"{module}.warnings").warning("%s:%s: %s: %s", filename, lineno,
                                                             category.__name__, text)
            return
        shown(message, category, filename, lineno, file, line)

    showwarning._sd3plugin = True
    warnings.showwarning = showwarning
