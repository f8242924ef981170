"""Transforms: each applies one part of a plan to a model and returns a ``Handle`` that removes it.

Order (``sd3plugin.optimize``): settings, backend, fuse_qkv, attention, quantize, fuse_gelu, fp8_activation,
memory_format, lora, compile, compile_vae, compile_text_encoders, step_cache. See ``base.py`` for the contract.
"""
from .base import Handle, Run

__all__ = ["Handle", "Run"]
