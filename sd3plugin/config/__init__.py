"""Configuration: typed schema, YAML presets in conf/, composition and validation, mode tokens."""
from .compose import compose, validate
from .modes import TOKENS, PRESETS, parse_mode

__all__ = ["compose", "validate", "TOKENS", "PRESETS", "parse_mode"]
