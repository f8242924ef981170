"""flash-attn-4 internals sd3plugin relies on (written against flash-attn-4 4.0.0b36): where its CuTe DSL
kernel cache lives, and how to point an already imported copy at another folder."""
from __future__ import annotations

import logging

log = logging.getLogger("sd3plugin")


def cache_dir() -> str | None:
    """Where the imported flash-attn-4 keeps compiled kernels on disk (None: in memory only). It reads
    FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED/DIR once, at import."""
    from flash_attn.cute import cache_utils

    return cache_utils.CUTE_DSL_CACHE_DIR if cache_utils.CUTE_DSL_CACHE_ENABLED else None


def cache_flags(path: str) -> dict[str, object]:
    """Settings that point an already imported flash-attn-4's persistent kernel cache at ``path`` (for
    ``GLOBAL_SETTINGS.set_flag``, so ``disable()`` and each pipeline's scoped calls get theirs). FA4 reads
    its cache directory once, at import, and fixes each kernel cache's folder then; a process that
    optimizes a second pipeline with another cache_dir (the benchmark's variants) would otherwise keep
    writing kernels into the first one's, which may be deleted. Empty when FA4 is not imported yet (the
    environment variables decide) or keeps kernels in memory only."""
    import sys
    from pathlib import Path

    utils, iface = sys.modules.get("flash_attn.cute.cache_utils"), sys.modules.get("flash_attn.cute.interface")
    if utils is None or iface is None or not getattr(utils, "CUTE_DSL_CACHE_ENABLED", False):
        return {}
    try:
        root = Path(utils.CUTE_DSL_CACHE_DIR) if utils.CUTE_DSL_CACHE_DIR else utils.get_cache_path()
        flags: dict[str, object] = {"flash_attn.cute.cache_utils:CUTE_DSL_CACHE_DIR": path}
        for name, fn in sorted(vars(iface).items()):
            cache = getattr(fn, "compile_cache", None)
            if isinstance(getattr(cache, "cache_path", None), Path):
                new = Path(path) / cache.cache_path.relative_to(root)
                new.mkdir(parents=True, exist_ok=True)
                flags[f"flash_attn.cute.interface:{name}.compile_cache.cache_path"] = new
        return flags
    except (AttributeError, TypeError, ValueError, OSError) as exc:  # another flash-attn-4 layout
        log.warning("sd3plugin: cannot point flash-attn-4's kernel cache at %s (%s)", path, exc)
        return {}
