"""torch's precompile (Dynamo's ahead-of-time compile) behind one seam: every private torch API that the
precompiled transformer blocks use is here (checked by ``tests/test_compat_precompile.py``).

A precompiled function is what Dynamo and inductor make of one function for example inputs, serialized:
its guards, the transformed bytecode and inductor's compiled graph with its kernels (bundled). Loading it
in another process runs no tracing and no compilation; a call whose inputs fail the guards must not use it.

Written against torch 2.13, where ``torch.compile(fn, fullgraph=True).aot_compile(((args), {kwargs}))``
returns ``torch._dynamo.aot_compile.AOTCompiledFunction`` (public side: ``save_compiled_function`` /
``torch.compiler.load_compiled_function``). Earlier torch (2.10-2.12) has no ``.aot_compile`` on a compiled
function but the same machinery as ``torch._dynamo.aot_compile.aot_compile_fullgraph(fn, example_inputs,
hooks, backend)``: used when the public method is missing (``api()`` says which). Where neither exists
(torch < 2.10, the nexfort stack's 2.4) ``support()`` says so and sd3plugin compiles as before.

Guards: Dynamo cannot serialize guards on object identity (functions, modules, classes:
``CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES``) nor, usefully, on globals. They are left
out (``guard_filter``); what they protected is checked instead when an artefact is loaded: the same torch,
Python, GPU, diffusers and sd3plugin versions (``sd3plugin.cache.precompiled``) and the same source of
every function Dynamo inlined (``source_changes``). Tensor guards (shapes, dtypes, devices, strides),
module structure and attribute values, grad mode and the other global state stay.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from typing import Any, Callable

PUBLIC = "torch.compile(fn, fullgraph=True).aot_compile"
PRIVATE = "torch._dynamo.aot_compile.aot_compile_fullgraph"


def _aot_module():
    return importlib.import_module("torch._dynamo.aot_compile")


@functools.lru_cache(maxsize=1)
def api() -> str | None:
    """Which way this torch precompiles: ``PUBLIC``, ``PRIVATE`` or None."""
    import torch

    try:
        module = _aot_module()
    except ImportError:
        return None
    if not hasattr(module, "AOTCompiledFunction"):
        return None
    probe = torch.compile(lambda x: x, fullgraph=True)
    if hasattr(probe, "aot_compile"):
        return PUBLIC
    return PRIVATE if hasattr(module, "aot_compile_fullgraph") else None


def support() -> tuple[bool, str]:
    """(usable, reason): whether this torch can precompile and load precompiled functions."""
    import torch

    problems = check()
    if problems:
        return False, f"torch {torch.__version__} has no usable precompile API ({problems[0]})"
    return True, f"torch {torch.__version__}: {api()}"


def check() -> list[str]:
    """What the installed torch lacks of what this module uses (empty: everything is there)."""
    problems = []
    try:
        module = _aot_module()
    except ImportError as exc:
        return [f"torch._dynamo.aot_compile does not import ({exc})"]
    cls = getattr(module, "AOTCompiledFunction", None)
    if cls is None:
        return ["torch._dynamo.aot_compile.AOTCompiledFunction is missing"]
    for name in ("serialize", "deserialize", "guard_check"):
        if not hasattr(cls, name):
            problems.append(f"AOTCompiledFunction.{name} is missing")
    if api() is None:
        problems.append(f"neither {PUBLIC} nor {PRIVATE} exists")
    try:
        from torch._dynamo.guards import CheckFunctionManager
        from torch._dynamo.hooks import Hooks  # noqa: F401

        CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES  # noqa: B018
    except (ImportError, AttributeError) as exc:
        problems.append(f"Dynamo's guard serialization API changed ({exc})")
    return problems


def guard_filter(entries) -> list[bool]:
    """Keep every guard Dynamo can serialize and that is not on a global (see the module docstring)."""
    from torch._dynamo.guards import CheckFunctionManager

    bad = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (e.is_global or e.guard_type in bad or bad.intersection(getattr(e, "derived_guard_types", ()) or ()))
            for e in entries]


def compile_function(fn: Callable, args: tuple, kwargs: dict, options: dict, dynamic: bool,
                     prefer: str | None = None):
    """Precompile ``fn(*args, **kwargs)`` with inductor and ``options``; returns the compiled function.

    ``prefer``: force ``PUBLIC`` or ``PRIVATE`` (tests); default: the public method where it exists."""
    import torch

    way = prefer or api()
    if way == PUBLIC:
        compiled = torch.compile(fn, fullgraph=True, backend="inductor", dynamic=dynamic,
                                 options={**options, "guard_filter_fn": guard_filter})
        return compiled.aot_compile((tuple(args), dict(kwargs)))
    if way == PRIVATE:
        from torch._dynamo.hooks import Hooks

        module = _aot_module()
        backend = torch._TorchCompileInductorWrapper(None, dict(options), dynamic)
        extra = {"dynamic": dynamic} if "dynamic" in inspect.signature(module.aot_compile_fullgraph).parameters else {}
        if "dynamic" not in extra and dynamic:
            from torch._dynamo.eval_frame import set_enable_dynamic  # what the public path does on 2.13

            with set_enable_dynamic(True):
                return module.aot_compile_fullgraph(fn, (tuple(args), dict(kwargs)),
                                                    hooks=Hooks(guard_filter_fn=guard_filter), backend=backend)
        return module.aot_compile_fullgraph(fn, (tuple(args), dict(kwargs)), hooks=Hooks(guard_filter_fn=guard_filter),
                                            backend=backend, **extra)
    raise RuntimeError(support()[1])


def serialize(compiled) -> bytes:
    """The bytes of a precompiled function (torch 2.13 returns a result object, earlier torch bytes)."""
    result = type(compiled).serialize(compiled)
    return result if isinstance(result, (bytes, bytearray)) else result.serialized_data


def deserialize(data: bytes, f_globals: dict | None = None):
    """A precompiled function from ``serialize``'s bytes; raises on damage or another environment (torch
    checks Python, torch, CUDA and GPU name itself)."""
    cls = _aot_module().AOTCompiledFunction
    return cls.deserialize(bytes(data), f_globals)


def guard_check(compiled, args: tuple, kwargs: dict) -> bool:
    """Whether the precompiled function may run these inputs (in the current grad mode and settings)."""
    return bool(compiled.guard_check(*args, **kwargs))


def guard_failure(compiled, args: tuple, kwargs: dict) -> str:
    """The first guard these inputs fail, as Dynamo words it (for the report)."""
    try:
        f_locals = (compiled.prepare_f_locals(*args, **kwargs) if hasattr(compiled, "prepare_f_locals")
                    else _aot_module().bind_locals(compiled._artifacts.signature, *args, **kwargs))
        info = compiled._artifacts.guard_manager.check_verbose(f_locals)
        parts = getattr(info, "verbose_code_parts", None) or [str(info)]
        return str(parts[0])[:300]
    except Exception as exc:  # a report nicety: never fail a call for it
        return f"(guard failure not readable: {type(exc).__name__})"


def call(compiled, args: tuple, kwargs: dict) -> Any:
    """Run a precompiled function whose guards were checked already (no second check)."""
    fn = getattr(compiled, "fn", None)
    return fn(*args, **kwargs) if fn is not None else compiled(*args, **kwargs)


def source_checksum(module, firstlineno: int, lastlineno: int) -> str:
    """The checksum Dynamo records for lines ``firstlineno`` to ``lastlineno`` (exclusive) of ``module``
    (``torch._dynamo.package._hash_sourcelines``: sha256 of the lines' text), computed here."""
    lines = inspect.getsourcelines(module)[0][firstlineno - 1:lastlineno - 1]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def source_changes(compiled) -> list[str]:
    """Functions Dynamo inlined into ``compiled`` whose source is not the same here any more."""
    changed = []
    info = getattr(compiled._artifacts, "source_info", None)
    for src in sorted(getattr(info, "inlined_sources", ()), key=lambda s: (s.module, s.firstlineno)):
        try:
            module = importlib.import_module(src.module)
            same = source_checksum(module, src.firstlineno, src.lastlineno) == src.checksum
        except Exception:  # module gone, source not readable
            same = False
        if not same:
            changed.append(f"{src.module} (lines {src.firstlineno}-{src.lastlineno})")
    return changed
