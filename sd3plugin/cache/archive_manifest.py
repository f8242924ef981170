"""The archive's manifest and member names, checked before anything they describe is read or written.

Names are checked in an order that bounds work and memory whatever they are: type, length in bytes,
characters and depth first, only then split into parts; the folders all names imply are counted before
the set of them is built (``manifest_folders``), for ``install`` and ``info`` alike.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from . import precompiled, store
from .archive_limits import (FORMAT, MANIFEST, MAX_DEPTH, MAX_FOLDER_PREFIX_BYTES, MAX_FOLDERS, MAX_JSON_CONTAINERS,
                             MAX_JSON_DEPTH, MAX_NAME)
from .errors import CorruptArchiveError

if TYPE_CHECKING:
    from .tar_reader import Member

FP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HEX64 = re.compile(r"[0-9a-f]{64}")


def entry_file(parts: list[str]) -> bool:
    """entries/<fingerprint>/<file>, or entries/<fingerprint>/precompiled/<file> (the precompiled blocks)."""
    return len(parts) == 3 or (len(parts) == 4 and parts[2] == precompiled.FOLDER)


# C0 and C1 control characters, DEL, lone surrogates (not encodable, so not a file name), line and paragraph
# separators and bidirectional overrides (they make one line print as two, or in another order)
_UNSAFE_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_member_name(name: str) -> str:
    """The member's safe relative path, or CorruptArchiveError for absolute paths, ``..`` and strays.

    Checked in an order that bounds work and memory whatever the name: type, characters, length in
    bytes and depth first, only then split into parts."""
    if not isinstance(name, str):
        raise CorruptArchiveError(f"unsafe archive member {name!r}: not a name; refusing to install")
    shown = ascii(name[:80]) + ("..." if len(name) > 80 else "")
    if not name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise CorruptArchiveError(f"unsafe archive member {shown}: absolute path; refusing to install")
    if len(name) > MAX_NAME or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise CorruptArchiveError(f"unsafe archive member {shown}: a name over {MAX_NAME} bytes (UTF-8); "
                                  "refusing to install")
    bad_char = _UNSAFE_CHAR.search(name)
    if bad_char:
        raise CorruptArchiveError(f"unsafe archive member {shown}: a control character, line separator or lone "
                                  f"surrogate ({ascii(bad_char.group())}) in the name; refusing to install")
    if name.count("/") > MAX_DEPTH:
        raise CorruptArchiveError(f"unsafe archive member {shown}: over {MAX_DEPTH} folders deep; refusing "
                                  "to install")
    parts = name.split("/")
    if parts[-1] == "":  # a folder member's trailing slash
        parts = parts[:-1]
    if any(p in ("..", ".", "") for p in parts):
        raise CorruptArchiveError(f"unsafe archive member {shown}: '..' or '.' in the path, or an empty part; "
                                  "refusing to install")
    if parts[0] not in store.PACKED_DIRS:
        raise CorruptArchiveError(f"unsafe archive member {shown}: outside {'/, '.join(store.PACKED_DIRS)}/, "
                                  "the only folders of a cache archive; refusing to install")
    if any(len(p.encode()) > 255 for p in parts):
        raise CorruptArchiveError(f"unsafe archive member {shown}: a path component over 255 bytes; "
                                  "refusing to install")
    return "/".join(parts)


def check_member_type(m: Member) -> None:
    if m.isreg or m.isdir:
        return
    target = f" -> {m.linkname}" if m.type in (b"1", b"2") else ""
    raise CorruptArchiveError(f"unsafe archive member {m.name!r}{target}: a {m.kind}; cache archives hold "
                              "only regular files and folders; refusing to install")


def json_containers(data: bytes) -> int:
    return data.count(b"{") + data.count(b"[")


def parse_manifest(data: bytes, path) -> dict:
    """The manifest, checked: types, names, sizes, checksums, entries. CorruptArchiveError otherwise."""
    def bad(what):
        return CorruptArchiveError(f"{path}: {MANIFEST} {what}; the archive was altered or damaged")

    if json_containers(data) > MAX_JSON_CONTAINERS:
        raise bad(f"has over {MAX_JSON_CONTAINERS} JSON objects and arrays (the limit)")
    try:
        manifest = json.loads(data)
    except RecursionError:
        raise bad("is nested too deeply") from None
    except ValueError:
        raise CorruptArchiveError(f"{path}: {MANIFEST} is not valid JSON; the archive is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptArchiveError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                                  f"is not {FORMAT!r}; pack it again with this sd3plugin")
    stack = [(manifest, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"is nested over {MAX_JSON_DEPTH} levels deep")
        children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        strings = list(obj) if isinstance(obj, dict) else []
        strings += [c for c in children if isinstance(c, str)]
        if any(_has_surrogate(x) for x in strings):
            raise bad("has a string with a lone surrogate (not Unicode text)")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptArchiveError(f"{path}: manifest has no file list; not an sd3plugin cache archive")
    for name, info in files.items():  # every name checked (bytes, depth) before any is expanded
        rel = check_member_name(name)
        if rel != name:
            raise bad(f"lists {ascii(name[:80])}, not a normalised path")
        if (not isinstance(info, dict) or type(info.get("size")) is not int or info["size"] < 0
                or not isinstance(info.get("sha256"), str) or not HEX64.fullmatch(info["sha256"])):
            raise bad(f"has no valid size and sha256 for {ascii(name[:80])}")
    folders = manifest_folders(files, path)
    clash = folders & set(files)
    if clash:
        raise CorruptArchiveError(f"{path}: member {sorted(clash)[0]!r} is both a file and a folder; the archive "
                                  "was altered")
    for name in files:
        parts = name.split("/")
        if len(parts) < 2:
            raise bad(f"lists {name!r} as a file: it is the folder of the cache archive's {name}/ files")
        if parts[0] == store.ENTRIES and not entry_file(parts):
            raise bad(f"lists {name!r}: entry files are entries/<fingerprint>/<file> or "
                      f"entries/<fingerprint>/{precompiled.FOLDER}/<file>")
    total = sum(f["size"] for f in files.values())
    if manifest.get("total_bytes") != total or type(manifest.get("total_bytes")) is not int:
        raise bad(f"declares total_bytes {manifest.get('total_bytes')!r}, its files sum to {total}")
    entries = manifest.get("entries", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("has no valid entry list")
    fps = set()
    for e in entries:
        fp = e.get("fingerprint")
        if not isinstance(fp, str) or not FP_RE.fullmatch(fp) or fp in fps:
            raise bad(f"has an entry with an invalid or repeated fingerprint {fp!r}")
        fps.add(fp)
        if f"{store.ENTRIES}/{fp}/{store.ENTRY_FILE}" not in files:
            raise bad(f"lists entry {fp} without its {store.ENTRIES}/{fp}/{store.ENTRY_FILE}")
        for key, kind in (("config", dict), ("composed_config", dict), ("environment", dict), ("shapes", list),
                          ("blobs", dict)):
            if e.get(key) is not None and not isinstance(e[key], kind):
                raise bad(f"has an entry {fp} whose {key} is not a JSON {'object' if kind is dict else 'array'}")
    for name in files:
        parts = name.split("/")
        if parts[0] == store.ENTRIES and parts[1] not in fps:
            raise bad(f"lists {name!r} of an entry it does not describe")
    env = manifest.get("environment", {})
    if not isinstance(env, dict) or not _plain_environment(env):
        raise bad("has no valid environment (values are plain strings, numbers or null, without control "
                  "characters)")
    for e in entries:
        if not _plain_environment(e.get("environment") or {}):
            raise bad(f"has an entry {e['fingerprint']} without a valid environment")
    return manifest


def _plain_environment(env: dict) -> bool:
    """Values that messages print as they are: no containers, no control characters (one line)."""
    return all(not isinstance(v, (dict, list)) and not (isinstance(v, str) and _UNSAFE_CHAR.search(v))
               and not _UNSAFE_CHAR.search(k) for k, v in env.items())


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def manifest_folders(files: dict, path) -> set[str]:
    """Every folder the (already name-checked) ``files`` imply. The work and memory this takes are
    bounded before anything is built: the sum over names of (bytes x depth) is checked first."""
    depth = sum(n.count("/") for n in files)  # names are checked: at most MAX_NAME bytes, MAX_DEPTH deep
    expanded = sum(len(n) * n.count("/") for n in files)
    if depth > MAX_FOLDERS or expanded > MAX_FOLDER_PREFIX_BYTES:
        raise CorruptArchiveError(f"{path}: {MANIFEST} lists names whose folders add up to over "
                                  f"{MAX_FOLDER_PREFIX_BYTES} bytes (too many or too deeply nested names for a "
                                  "cache archive); the archive was altered")
    folders: set[str] = set()
    for n in files:
        i = n.find("/")
        while i != -1:
            folders.add(n[:i])
            i = n.find("/", i + 1)
    return folders
