"""Compile caches, storage only: where they live (``cache_paths``), the layout of a cache dir and its
entries (``store``), Mega-Cache blobs (``megacache``), archives and
their manifests (``archive``, ``manifest``), the cache dir's lock and the errors of the cache tools.

How a process uses a cache is the settings transform's job (``sd3plugin.transforms.settings.activate``;
``sd3plugin.backends.nexfort.activate_nexfort`` for nexfort); warming and verifying are applications
(``sd3plugin.apps.warm``, ``sd3plugin.apps.verify``); ``sd3plugin-cache`` (``cli/``) is the command line.
See docs/cache.md.
"""
from __future__ import annotations

from pathlib import Path

from . import store


def cache_paths(cache_dir: str | Path) -> dict[str, Path]:
    root = Path(cache_dir).expanduser()
    return {"root": root, "inductor": root / store.INDUCTOR, "triton": root / store.INDUCTOR / "triton",
            "models": root / "models", "entries": root / store.ENTRIES, "installed": root / store.INSTALLED}
