"""Cache archives: a zstandard-compressed tar stream whose first member is ``manifest.json``.

The manifest lists every file with its size and sha256, the environment it was built on and the
entries (config, fingerprint, shapes). ``install`` opens the archive once and reads every byte through
that one file descriptor, hashing it (what is hashed is what is unpacked): with a trusted key or
``--expect-sha256`` it first hashes the file and checks the signature / pin, then reads the stream once
without writing anything (checksums, member safety, completeness), checks compatibility, then, under
the cache dir's lock, reads it again into a staging folder inside the cache dir and moves the content
into place under a journal (``store.Transaction``): all or nothing, even against SIGKILL.

The tar stream is parsed here, not by ``tarfile``: every header is checked before its data is read
(size caps on PAX and GNU long-name headers, no sparse files, only regular files and folders, each
member's declared size equal to the manifest's), and the decompressed stream is capped, so memory and
time are bounded whatever the archive (limits below and in docs/cache.md, "Guarantees").

An archive is code: its Mega-Cache blobs and inductor entries are pickles and compiled libraries that
torch loads and runs. Install archives only from sources you trust: sign them (``pack --sign``) and
install with ``--trust`` (or ``SD3PLUGIN_TRUSTED_KEY``), or pin them with ``--expect-sha256``.

This module is the public face; the work is done by one module per concern:

- ``archive_limits``: the format names and every limit;
- ``tar_reader`` (with ``zstd_frames``): the archive opened once, hashed, decompressed and parsed, bounded;
- ``archive_manifest``: the manifest and member names, checked;
- ``archive_scan``: a whole archive read against its manifest (pass 1 and 2 of install, ``info``);
- ``pack``: writing an archive; ``install`` and ``install_commit``: verifying and committing one.
"""
from __future__ import annotations

from .archive_limits import *  # noqa: F401,F403  (FORMAT, MANIFEST, the limits)
from .archive_manifest import (FP_RE, HEX64, check_member_name, check_member_type, entry_file,  # noqa: F401
                               manifest_folders, parse_manifest)
from .archive_scan import read_manifest, scan, scan_source, signature_status  # noqa: F401
from .install import check_compatibility, install  # noqa: F401
from .pack import build_manifest, pack  # noqa: F401
from .tar_reader import Member, Source, Stream, TarReader, file_sha256  # noqa: F401

# the names these had when they lived here (patch the defining module, not these, in tests)
_Source, _scan = Source, scan_source
