"""The cache dir's storage, one name for the modules that hold it (``from . import store``):

- ``layout``: names, atomic writes, JSON files, the packable files, ``confine`` (paths read from the cache
  dir's metadata never leave it);
- ``entries``: ``entries/<fingerprint>/`` with ``entry.json`` and Mega-Cache blobs;
- ``journal``: journaled installs (``Transaction``), rollback and ``recover`` of interrupted commands;
- ``checksums``: ``checksums.json``, ``check_files`` (damage found by content) and ``repair``.
"""
from __future__ import annotations

import os  # noqa: F401  (tests patch store.os.rename: the renames of a commit)

from .checksums import (check_files, file_record, forget_checksums, lost_record, read_checksums,  # noqa: F401
                        refresh_checksums, repair, restat_moved, sha256_file)
from .entries import add_blob, blob_paths, entry_dir, find_entries, list_entries, safe_name, shape_key  # noqa: F401
from .journal import Transaction, leftovers, recover, rollback  # noqa: F401
from .layout import (BLOB_SUFFIX, CHECKSUMS, ENTRIES, ENTRY_FILE, INDUCTOR, INSTALL_PREFIX, INSTALLED,  # noqa: F401
                     JOURNAL, PACKED_DIRS, PRECOMPILED, SKIP_NAMES, OutsideError, _now, atomic_write, confine, default_mode,
                     dir_size, has_cache, human_size, is_confined, iter_files, open_regular, read_json, read_regular,
                     remove_tree, write_json)
