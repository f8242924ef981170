"""What ``model=`` names: an architecture preset, a local diffusers folder or a Hub id, and one-line errors
(``ModelError``, exit code 2) when it is none of them or cannot be reached.

``check_model_source(model)`` refuses a missing or incomplete folder before anything loads;
``check_reachable(model)`` also asks the Hub (or its local cache) for a Hub id, for the commands that start
another process to load the model (``sd3plugin-cache verify``);
``load_error(model, exc)`` turns what diffusers / huggingface_hub raise for a Hub id (no network, no such
repository, a gated one) into one sentence naming the problem and the fix.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .models import ARCHITECTURES

HUB_EXAMPLE = "stabilityai/stable-diffusion-3-medium-diffusers"


def presets_hint() -> str:
    return "one of the presets " + ", ".join(ARCHITECTURES) + " (random weights, built locally)"


def _looks_like_a_path(model: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else with a separator or a leading ./ ~ is a path."""
    if model.startswith((".", "~", "/")) or "\\" in model or model.count("/") > 1:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model)
    except ImportError:
        return False
    except ValueError:
        return True
    return False


def check_model_source(model: str) -> str:
    """``"preset"``, ``"folder"`` or ``"hub"`` for ``model``; a ModelError for a folder that is missing or
    not a diffusers pipeline folder."""
    model = str(model)
    if model in ARCHITECTURES:
        return "preset"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model={model!r} is a folder without model_index.json, not a diffusers pipeline "
                             f"folder; give the folder that holds model_index.json (as save_pretrained writes "
                             f"it), a Hub id such as {HUB_EXAMPLE}, or {presets_hint()}")
        return "folder"
    if path.exists():
        raise ModelError(f"model={model!r} is a file; give a diffusers pipeline folder (with model_index.json), "
                         f"a Hub id such as {HUB_EXAMPLE}, or {presets_hint()}")
    if _looks_like_a_path(model):
        raise ModelError(f"model={model!r} is neither a folder with model_index.json nor a Hub id (no such "
                         f"folder); give a local diffusers folder, a Hub id such as {HUB_EXAMPLE}, or "
                         f"{presets_hint()}")
    return "hub"


def check_reachable(model: str) -> str:
    """``check_model_source``, and for a Hub id that its ``model_index.json`` is in the local Hub cache or can
    be fetched (a small file ``from_pretrained`` reads first anyway): a ModelError naming the problem (no
    network, no such repository, a gated one) and the fix, before a process is started or anything loads."""
    kind = check_model_source(model)
    if kind != "hub":
        return kind
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return kind
    if isinstance(try_to_load_from_cache(str(model), "model_index.json"), str):
        return kind
    try:
        hf_hub_download(str(model), "model_index.json")
    except Exception as exc:  # what the Hub client raises: offline, not found, gated, HTTP errors
        raise load_error(str(model), exc) from None
    return kind


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


_HUB_MODULES = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")


LOADING_MARK = "_sd3plugin_raised_while_loading"


def mark_load_error(exc: BaseException) -> None:
    """Record on ``exc`` that diffusers raised it while reading the model (the hook calls this), before any
    optimization ran."""
    try:
        setattr(exc, LOADING_MARK, True)
    except AttributeError:  # an exception type without a __dict__
        pass


def is_load_error(model: str, exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a hooked ``from_pretrained``) comes from finding or reading the model, not
    from optimizing it: the hook saw diffusers raise it, the Hub client raised it, or its message names the
    model."""
    if getattr(exc, LOADING_MARK, False):
        return True
    for e in _chain(exc):
        if type(e).__module__.startswith(_HUB_MODULES) or str(model) in str(e):
            return True
    return False


def load_error(model: str, exc: BaseException) -> ModelError:
    """One line for a model that failed to load: what went wrong (from the exception chain) and the fix."""
    names = [type(e).__name__ for e in _chain(exc)]
    if Path(str(model)).expanduser().is_dir():
        return ModelError(f"model={model!r}: the folder could not be loaded as an SD3 pipeline "
                          f"({_first_line(exc)}); check that it is a complete diffusers folder of an SD3 model")
    if any("Gated" in n for n in names):
        return ModelError(f"model={model!r} is a gated Hub repository: accept its licence on huggingface.co, "
                          "log in (hf auth login) and run again, or give a local diffusers folder")
    if any("RepositoryNotFound" in n or "RevisionNotFound" in n for n in names):
        return ModelError(f"model={model!r} is not a repository on the Hub (or a private one: log in with hf auth "
                          f"login); check the spelling, e.g. {HUB_EXAMPLE}, or use {presets_hint()}")
    offline = [e for e in _chain(exc) if any(w in type(e).__name__ for w in ("Connect", "Timeout", "Offline"))]
    why = f"no network: {_first_line(offline[-1], 100)}" if offline else f"no network? {_first_line(exc, 100)}"
    return ModelError(f"model={model!r} is neither a folder with model_index.json nor a reachable Hub id ({why}); "
                      f"give a local diffusers folder (download it where there is network: hf download {model} "
                      f"--local-dir DIR) or {presets_hint()}")
