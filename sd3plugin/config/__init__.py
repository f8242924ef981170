"""Configuration: typed schema, presets, composition and pure validation, mode tokens.

Layering: config imports nothing of sd3plugin above it (no backends, optimize, cache or models at import
time). ``check_hardware`` is the only part that asks the machine, and only when called.
"""
from .compose import compose, validate
from .hardware import check_hardware
from .modes import PRESETS, TOKENS, parse_mode
from .resolve import resolve_device, resolve_dtype
from .schema import compile_keys, run_keys

__all__ = ["compose", "validate", "check_hardware", "resolve_device", "resolve_dtype", "compile_keys",
           "run_keys", "TOKENS", "PRESETS", "parse_mode"]
