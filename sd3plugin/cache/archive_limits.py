"""The format of cache archives and the limits of what ``install`` and ``info`` read (docs/cache.md,
"Guarantees"). Every limit is checked before the work or memory it bounds is spent."""
from __future__ import annotations

FORMAT = "sd3plugin-cache/1"
MANIFEST = "manifest.json"
CHUNK = 1 << 20
BLOCK = 512

# Limits of what install and info read (docs/cache.md, "Guarantees").
MAX_MANIFEST_BYTES = 4 * 2**20      # about 20,000 files; pack refuses to write a larger one
MAX_JSON_CONTAINERS = 200_000       # JSON objects + arrays in the manifest (bounds its memory)
MAX_JSON_DEPTH = 32
MAX_HEADER_BYTES = 64 * 2**10       # one PAX or GNU long-name header
MAX_EXTENDED_HEADERS = 4            # PAX / long-name headers before one member
MAX_WINDOW_LOG = 25                 # zstd window: 32 MiB (pack uses at most this)
MAX_RATIO = 1000                    # unpacked bytes per archive byte, beyond RATIO_SLACK
RATIO_SLACK = 64 * 2**20
MAX_TRAILING = 2**20                # zero padding accepted after the end-of-archive blocks
MAX_NAME = 1024                     # bytes (UTF-8) of one member's path
MAX_DEPTH = 16                      # folders in one member's path (real caches use at most 6)
MAX_FOLDER_PREFIX_BYTES = 32 * 2**20  # sum over names of (bytes x depth): bounds the folder set built
MAX_FOLDERS = 400_000               # sum over names of depth
