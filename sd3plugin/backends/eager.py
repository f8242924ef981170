"""The eager backend: no compilation (quantization, QKV fusion and memory format still apply)."""
from . import register_backend
from .base import Backend


@register_backend("eager")
class EagerBackend(Backend):
    pass
