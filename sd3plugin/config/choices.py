"""The fixed choices of config keys: one table each, and the enum Hydra validates it with.

Each enum member's name is its value (``Device.cpu == "cpu"``), so users write the plain word
(``device=cpu``, ``on_error=raise``) and code compares with plain strings. ``str()`` and f-strings give
the value. Backend names are not here: plugins may add backends, so they live in ``schema.BACKENDS``.
"""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str enum that prints as its value (``f"{Device.cpu}" == "cpu"``, ``repr(Device.cpu) == "'cpu'"``),
    so messages and reports read as if the value were the plain string."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice_enum(name: str, table: tuple[str, ...]) -> type[Choice]:
    return Choice(name, [(v, v) for v in table], module=__name__, qualname=name)


ON_ERROR = ("fallback", "raise")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
MEMORY_FORMATS = ("channels_last", "contiguous_format", "preserve")
# Attention kernels of the optimized transformer; sd3plugin.attention imports this as its KERNELS.
ATTENTION_KERNELS = ("auto", "sdpa", "fa4", "fa3", "fa3_fp8", "int8", "int8_fp8")

OnError = _choice_enum("OnError", ON_ERROR)
Device = _choice_enum("Device", DEVICES)
Dtype = _choice_enum("Dtype", DTYPES)
MemoryFormat = _choice_enum("MemoryFormat", MEMORY_FORMATS)
Attention = _choice_enum("Attention", ATTENTION_KERNELS)


def values(enum_or_table) -> tuple[str, ...]:
    """The plain string values of an enum class or a table."""
    if isinstance(enum_or_table, type) and issubclass(enum_or_table, Enum):
        return tuple(m.value for m in enum_or_table)
    return tuple(enum_or_table)
