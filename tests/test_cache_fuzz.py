"""Property-based fuzzing of ``install`` and ``info`` with hostile archives built from the archive grammar.

Hypothesis generates three families of inputs, each starting from a real archive (``pack`` of the small
crafted cache of ``test_cache_archive.make_cache``) and changing it the way the grammar allows:

- tar streams: every member in another dialect (ustar, ustar prefix, GNU long name, PAX path, PAX size,
  v7, base-256 sizes), folder members, harmless and hostile extended headers, links, devices, sparse
  members, size lies, bad checksums, duplicate / missing / extra members, hostile names (``..``, absolute,
  control characters incl. C1, lone surrogates, deep one-character folders, wide components), truncation,
  trailing data;
- manifests: deep nesting, many long names of one-character folders, huge counts, surrogates, control
  characters, wrong types, huge numbers, other JSON encodings, the environment of another machine;
- zstd framing: several data frames, skippable frames before / between / after them, windows over the
  limit, truncation, trailing bytes.

For every input, ``install`` (into a copy of an installed cache dir) and ``info`` must keep the promises of
docs/cache.md, "Guarantees": an exit code of the documented set (and the one the docs give for that kind of
input), one line on stderr and no traceback, peak RSS <= 400 MB, CPU time within a bound proportional to the
archive's size, nothing written outside the cache dir, the cache tree byte for byte unchanged on refusal and,
on success, exactly the manifest's bytes installed.

The commands run through ``sd3plugin.cli.cache.main`` (what ``sd3plugin-cache`` runs, with its mapping of
errors to exit codes) in one long-lived worker process (``WORKER``): it imports what the CLI imports, resets
its peak RSS (``/proc/self/clear_refs``) before each command and reports ``VmHWM`` after it, a watchdog
thread ends it past ``RSS_KILL_MB`` and the test ends it past the time bound (it is then started again).
A few inputs also go through the real ``sd3plugin-cache`` executable.

Fast lane: a short derandomized run of each family. Slow lane: 10,000+ inputs
(``python -m pytest -q -m slow tests/test_cache_fuzz.py``); ``SD3PLUGIN_FUZZ_EXAMPLES=N`` sets the count of each
family of the slow lane. Failing archives are kept under the test's temporary folder (the message names
them) so ``sd3plugin-cache install FILE`` reproduces them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd3plugin.cli.exit_codes import EXIT

from .test_cache_archive import FP, cli, make_cache
from .test_cache_hostile import END, pad, tree

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT_MB = 400            # docs/cache.md, "Guarantees"
RSS_KILL_MB = 450             # the worker ends itself beyond this (the machine is shared)
TIME_BASE_S = 3.0             # CPU seconds of one command on any archive, plus
TIME_PER_BYTE_S = 1000 / 20e6  # each archive byte may unpack to 1000 bytes, handled at >= 20 MB/s
ESCAPE = "sd3fuzz-escape"     # the name hostile paths aim at, outside the cache dir
MiB = 2**20

OK, USAGE, CORRUPT, INCOMPATIBLE, CANNOT_WRITE = (EXIT["ok"], EXIT["usage"], EXIT["corrupt"],
                                                   EXIT["incompatible"], EXIT["cannot_write"])


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


FAST = {"tar": 45, "manifest": 45, "zstd": 35}
SLOW = {"tar": 4000, "manifest": 2600, "zstd": 3600}  # 10,200 inputs (manifests cost the most)
if os.environ.get("SD3PLUGIN_FUZZ_EXAMPLES"):
    SLOW = dict.fromkeys(SLOW, int(os.environ["SD3PLUGIN_FUZZ_EXAMPLES"]))


# -- the real archive these inputs start from ------------------------------------------------------------
@dataclass
class Base:
    manifest: dict
    files: dict  # name -> bytes, in the archive's order


BASE: list[Base] = []  # filled by the ``fuzz`` fixture before any strategy draws
BASE_ARCHIVE: list[Path] = []


def base() -> Base:
    assert BASE, "the fuzz fixture builds the base archive first"
    return BASE[0]


def read_archive(data: bytes) -> Base:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert members[0][0] == "manifest.json"
    return Base(json.loads(members[0][1]), dict(members[1:]))


# -- tar grammar ---------------------------------------------------------------------------------------------
def raw_name(name: str) -> bytes:
    """UTF-8; lone surrogates as surrogateescape bytes (not UTF-8) or CESU (surrogatepass)."""
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return name.encode("utf-8", "surrogatepass")


def header(name: bytes, size: int, type_: bytes = b"0", mode: int = 0o644, linkname: bytes = b"",
           magic: bytes = b"ustar\x0000", prefix: bytes = b"", size_field: bytes | None = None,
           bad_checksum: bool = False) -> bytes:
    """One 512-byte tar header from raw fields (``test_cache_hostile.tar_header`` takes text)."""
    b = bytearray(512)
    b[0:len(name[:100])] = name[:100]
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b[116:124] = b"%07o\0" % 0
    if size_field is None:
        size_field = b"%011o\0" % size if 0 <= size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    b[124:136] = size_field[:12].ljust(12, b"\0")
    b[136:148] = b"%011o\0" % 0
    b[156:157] = type_
    b[157:157 + len(linkname[:100])] = linkname[:100]
    b[257:265] = magic
    b[345:345 + len(prefix[:155])] = prefix[:155]
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % (sum(b) + (7 if bad_checksum else 0))
    return bytes(b)


def pax(records: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for k, v in records:
        body = b" " + k + b"=" + v + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def ext(type_: bytes, data: bytes, declared: int | None = None) -> bytes:
    """An extended header member (PAX ``x``/``g``, GNU ``L``/``K``) carrying ``data``."""
    return header(b"././@LongLink" if type_ in b"LK" else b"pax", len(data) if declared is None else declared,
                  type_) + pad(data)


DIALECTS = ("ustar", "prefix", "gnu", "pax", "pax_size", "v7", "base256")


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = b"0"
    dialect: str = "ustar"
    size: int | None = None          # declared size (None: the data's)
    size_field: bytes | None = None  # a raw size field
    linkname: str = ""
    before: list = field(default_factory=list)  # raw extended-header members written before it
    bad_checksum: bool = False

    def effective(self) -> str:
        """The dialect written: names too long for a ustar header fall back to a GNU long name."""
        name, d = raw_name(self.name), self.dialect
        if d == "prefix":
            if _split(name) is not None:
                return d
            d = "ustar"
        return "gnu" if d in ("ustar", "v7", "base256") and len(name) > 100 else d

    def extended(self) -> int:
        """How many extended headers precede the member's own header."""
        return len(self.before) + (self.effective() in ("gnu", "pax", "pax_size"))

    def encode(self) -> bytes:
        name, size = raw_name(self.name), len(self.data) if self.size is None else self.size
        kw = dict(type_=self.type, linkname=raw_name(self.linkname), size_field=self.size_field,
                  bad_checksum=self.bad_checksum, mode=0o755 if self.type == b"5" else 0o644)
        out = b"".join(self.before)
        dialect = self.effective()
        if dialect == "prefix":
            prefix, rest = _split(name)
            return out + header(rest, size, prefix=prefix, **kw) + pad(self.data)
        if dialect == "gnu":
            out += ext(b"L", name + b"\0")
        elif dialect == "pax":
            out += ext(b"x", pax([(b"path", name)]))
        elif dialect == "pax_size":
            out += ext(b"x", pax([(b"path", name), (b"size", str(size).encode())]))
            kw["size_field"] = kw["size_field"] or b"%011o\0" % 0
        elif dialect == "v7":
            kw["magic"] = b"\0" * 8
        elif dialect == "base256" and kw["size_field"] is None:
            kw["size_field"] = b"\x80" + size.to_bytes(11, "big")
        return out + header(name, size, **kw) + pad(self.data)


def _split(name: bytes):
    """(prefix, name) of a ustar name split at a slash, or None."""
    for i in range(len(name) - 1, 0, -1):
        if name[i:i + 1] == b"/" and len(name) - i - 1 <= 100 and i <= 155 and i < len(name) - 1:
            return name[:i], name[i + 1:]
    return None


def tar_stream(members: list[Member], tail: bytes = END) -> bytes:
    return b"".join(m.encode() for m in members) + tail


# -- what the docs promise for a name ----------------------------------------------------------------------
ODD = {"Cf", "Co", "Cn", "Zl", "Zp", "Zs"}
DOTS = frozenset({"", ".", ".."})
CONTROL = re.compile("[\x00-\x1f\x7f\x80-\x9f]")  # C0, DEL, C1


def name_verdict(name: str) -> str:
    """'safe' (installs), 'edge' (installs or exit 4, never anything else) or 'unsafe' (exit 4): the member
    rules of docs/cache.md plus issue 20, item 8 (lone surrogates, C1 controls, overlong names are corrupt).
    (Regular expressions, not a loop per character: manifests list up to 60,000 names of 4,000 characters.)"""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "unsafe"
    if not name or name[0] in "/\\" or "\\" in name:
        return "unsafe"
    if CONTROL.search(name):
        return "unsafe"
    parts = name.split("/")
    if len(parts) < 2 or parts[0] not in ("entries", "inductor") or not DOTS.isdisjoint(parts):
        return "unsafe"
    if len(name) > 4096 or (max(map(len, parts)) > 63 and any(len(p.encode()) > 255 for p in parts)):
        return "unsafe"  # (a component of 63 characters or fewer is at most 252 UTF-8 bytes)
    if parts[0] == "entries":
        if parts[1] != FP or len(parts) != 3:
            return "unsafe"
        if parts[2] in ("precompiled", "entry.json") or parts[2].startswith("."):
            return "edge"
    if len(raw) > 1024 or len(parts) > 32 or _odd(name):
        return "edge"
    return "safe"


def _odd(name: str) -> bool:
    if name.isascii():
        return " " in name  # the one ASCII character of the ODD categories (Zs)
    import unicodedata
    return any(unicodedata.category(c) in ODD for c in set(name))


def clash(names) -> bool:
    """A name that is also a folder of another name."""
    names = set(names)
    lengths = {len(n) for n in names}
    return any(_has_folder_in(n, names, lengths) for n in names)


def _has_folder_in(n: str, names: set, lengths: set) -> bool:
    """One of ``n``'s folders is in ``names`` (whose lengths are ``lengths``). Only prefixes as long as some
    name are looked up, by length or by slash, whichever is fewer: a thousand names thousands of folders deep
    cost a pass over their characters, not their square."""
    if len(lengths) < n.count("/"):
        return any(L < len(n) and n[L] == "/" and n[:L] in names for L in lengths)
    i = n.find("/")
    while i != -1:
        if i in lengths and n[:i] in names:
            return True
        i = n.find("/", i + 1)
    return False


# -- hypothesis strategies ---------------------------------------------------------------------------------
SAFE = "abcdefghijklmnopqrstuvwxyz0123456789_-."
component = st.text(SAFE, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
safe_names = st.lists(component, min_size=1, max_size=4).map(lambda ps: "inductor/" + "/".join(ps))
names = st.one_of(
    safe_names,
    safe_names,
    component.map(lambda c: f"entries/{FP}/{c}"),
    st.builds(lambda k, c: "inductor/" + (c + "/") * k + "f", st.integers(1, 2100), st.sampled_from("ab")),
    st.builds(lambda n, k, ch: "inductor/" + "/".join([ch * n] * k), st.integers(1, 130), st.integers(1, 40),
              st.sampled_from(["é", "中", "😀", "a"])),
    st.builds(lambda k: "inductor/" + "../" * k + ESCAPE, st.integers(1, 5)),
    st.sampled_from([f"/tmp/{ESCAPE}/x", f"inductor\\..\\{ESCAPE}", f"./inductor/{ESCAPE}", "inductor//x",
                     "inductor/./x", "C:/x", "", "inductor", "inductor/", "models/x", f"{ESCAPE}/x",
                     f"entries/{FP}/a/b", "entries/feedfeedfeedfeed/x", "inductor/zz/" + "a" * 256,
                     "entries/../inductor/x", "inductor/..", "manifest.json"]),
    st.builds(lambda c: f"inductor/zz/a{chr(c)}b",
              st.one_of(st.integers(0, 31), st.just(127), st.integers(0x80, 0x9F))),
    st.builds(lambda c: f"inductor/zz/a{chr(c)}b", st.integers(0xD800, 0xDFFF)),
    st.builds(lambda c: f"inductor/zz/a{chr(c)}b", st.sampled_from([0x200B, 0x202E, 0xFEFF, 0x2028, 0xFFFF,
                                                                     0x10FFFF, 0xA0, 0x3000])),
    st.text(max_size=30).map(lambda t: "inductor/" + t),
)


class Case:
    """One archive and what the docs promise for it: the exit codes ``install`` and ``info`` may end with.
    (Not a dataclass: hypothesis prints falsifying examples with this ``repr``, without the bytes.)"""

    def __init__(self, family: str, desc: list, data: bytes, install: frozenset, info: frozenset, files: dict):
        self.family, self.desc, self.data, self.install, self.info = family, desc, data, install, info
        self.files = files  # what a successful install must have put there

    def __repr__(self):
        return (f"Case({self.family}: {'; '.join(self.desc)} | {len(self.data)} bytes | install -> "
                f"{sorted(self.install)}, info -> {sorted(self.info)})")


class Verdict:
    """Accumulates the verdict of a case: refused (exit 4), edge (0 or 4) or valid (0)."""

    def __init__(self):
        self.refuse = self.edge = self.incompatible = self.clash_8 = False
        self.info_refuse = self.info_edge = False

    def install_codes(self) -> frozenset:
        if self.refuse:
            return frozenset({CORRUPT})
        codes = {OK}
        if self.edge:
            codes |= {CORRUPT}
        if self.incompatible:
            codes = (codes - {OK}) | {INCOMPATIBLE}
        if self.clash_8:
            codes = (codes - {OK}) | {CANNOT_WRITE}
        return frozenset(codes)

    def info_codes(self) -> frozenset:
        if self.info_refuse:
            return frozenset({CORRUPT})
        return frozenset({OK, CORRUPT} if self.info_edge else {OK})


def _names_verdict(v: Verdict, files: dict, desc: list) -> None:
    for name in files:
        kind = name_verdict(name)
        if kind == "unsafe":
            v.refuse = v.info_refuse = True
        elif kind == "edge":
            v.edge = v.info_edge = True
    if clash(files):
        v.refuse = v.info_refuse = True


def _pristine_clash(files) -> bool:
    """A file of the installed cache where the archive has a folder, or the reverse (exit 8 by the docs)."""
    have = PRISTINE_FILES[0] if PRISTINE_FILES else set()
    folders = {h[:i] for h in have for i, c in enumerate(h) if c == "/"}
    lengths = {len(h) for h in have}
    return any(n in folders or _has_folder_in(n, have, lengths) for n in files)


PRISTINE_FILES: list[set] = []


def manifest_for(files: dict, template: dict) -> dict:
    m = json.loads(json.dumps(template))
    m["files"] = {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()}
    m["total_bytes"] = sum(len(v) for v in files.values())
    return m


def dumps(m) -> bytes:
    return json.dumps(m).encode()


HOSTILE_TAR = ("none", "none", "type", "link", "device", "sparse", "size_lie", "size_field", "checksum",
               "ext_count", "ext_big", "global_bad", "global_ok", "pax_malformed", "dup", "drop", "extra",
               "manifest_late", "nonutf8", "flip", "pax_traversal", "longlink_on_file", "dir_with_data")
TAILS = ("end", "end", "end", "one_block", "none", "zeros", "garbage", "truncate")


@st.composite
def tar_cases(draw) -> Case:
    b = base()
    files = dict(b.files)
    desc, v = [], Verdict()
    tar_only, manifest_only = {}, {}
    for _ in range(draw(st.integers(0, 2))):
        name, data = draw(names), draw(st.binary(max_size=40))
        where = draw(st.sampled_from(["both", "both", "both", "tar", "manifest"]))
        if name in files or name in tar_only or name in manifest_only or name == "manifest.json":
            continue  # one name, one place: a second add of it would undo the first's verdict
        desc.append(f"add {where} {name[:60]!r}{'...' if len(name) > 60 else ''} ({len(name)} chars)")
        if where == "both":
            files[name] = data
        elif where == "tar":
            tar_only[name] = data
            v.refuse = True
        else:
            manifest_only[name] = data
            v.refuse = True
    listed = {**files, **manifest_only}
    _names_verdict(v, listed, desc)
    if _pristine_clash(listed):
        v.clash_8 = True
    manifest = manifest_for(listed, b.manifest)
    order = draw(st.permutations(list(files) + list(tar_only)))
    members = [Member("manifest.json", dumps(manifest))]
    members += [Member(n, files.get(n, tar_only.get(n))) for n in order]
    for m in members:
        m.dialect = draw(st.sampled_from(DIALECTS))
    dialects = sorted({m.dialect for m in members})
    desc.append(f"dialects {','.join(dialects)}")
    if draw(st.booleans()):  # folder members for folders of the manifest (valid)
        folders = sorted({"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)})
        for f in draw(st.lists(st.sampled_from(folders), max_size=3, unique=True)) if folders else []:
            at = draw(st.integers(1, len(members)))
            members.insert(at, Member(f + "/", type=b"5", dialect=draw(st.sampled_from(DIALECTS))))
            desc.append(f"folder member {f[:40]!r}")
    if draw(st.booleans()):  # harmless PAX records before a member
        i = draw(st.integers(0, len(members) - 1))
        members[i].before.append(ext(b"x", pax([(b"comment", b"fuzz"), (b"mtime", b"1700000000.5")])))
        desc.append(f"PAX comment before member {i}")
    for i, m in enumerate(members):
        if m.extended() > 4:
            v.refuse = True
            if i == 0:
                v.info_refuse = True
    hostile = draw(st.sampled_from(HOSTILE_TAR))
    n = len(members)
    file_idx = [i for i, m in enumerate(members) if i and m.type != b"5"]
    i = draw(st.sampled_from(file_idx)) if file_idx else 0
    if hostile != "none":
        desc.append(f"{hostile} at member {i}")
    if hostile in ("type", "link", "device", "sparse"):
        if hostile == "type":
            members[i].type = draw(st.sampled_from([b"1", b"2", b"3", b"4", b"6", b"S", b"V", b"M", b"N", b"D",
                                                    b"A", b"Z", b"9", b"\x80"]))
        elif hostile == "link":
            members.insert(i, Member(f"inductor/zz/{ESCAPE}", type=draw(st.sampled_from([b"1", b"2"])),
                                     linkname=draw(st.sampled_from([f"/tmp/{ESCAPE}", "../../..", "/etc/passwd",
                                                                    "inductor/ab/kernel.py"]))))
        elif hostile == "device":
            members.insert(i, Member(f"inductor/zz/{ESCAPE}", type=draw(st.sampled_from([b"3", b"4", b"6"]))))
        elif draw(st.booleans()):
            members[i].type = b"S"
        else:
            members[i].before.append(ext(b"x", pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                                                    (b"GNU.sparse.realsize", b"1073741824")])))
        v.refuse = True
    elif hostile == "size_lie":
        delta = draw(st.one_of(st.integers(-600, 600).filter(bool), st.sampled_from([2**30, 2**33, 8**11])))
        members[i].size = max(0, len(members[i].data) + delta)
        if members[i].size == len(members[i].data):
            members[i].size += 1
        v.refuse = True
    elif hostile == "size_field":
        members[i].size_field = draw(st.sampled_from([b"\xff" * 12, b"0000000001x\0", b"9" * 11 + b"\0",
                                                      b"-000000001\0", b"0x10\0"]))
        members[i].dialect = "ustar"
        v.refuse = True
    elif hostile == "checksum":
        members[i].bad_checksum = True
        v.refuse = True
    elif hostile == "ext_count":
        members[i].before += [ext(b"x", pax([(b"comment", b"c")]))] * draw(st.integers(5, 7))
        v.refuse = True
    elif hostile == "ext_big":
        t = draw(st.sampled_from([b"x", b"g", b"L", b"K"]))
        members[i].before.append(header(b"././@LongLink", draw(st.sampled_from([64 * 1024 + 1, 2**30, 2**40])), t)
                                 + b"9 a=bbbb\n" * 100)
        v.refuse = True
    elif hostile in ("global_bad", "global_ok"):
        key = draw(st.sampled_from([b"path", b"size", b"linkpath", b"GNU.sparse.size"])) if hostile == "global_bad" \
            else draw(st.sampled_from([b"comment", b"mtime", b"uname", b"charset"]))
        members[i].before.append(ext(b"g", pax([(key, b"inductor/zz/evil" if key == b"path" else b"7")])))
        if hostile == "global_bad":
            v.refuse = True
    elif hostile == "pax_malformed":
        members[i].before.append(ext(b"x", draw(st.sampled_from([b"99999 path=x\n", b"5 a=b\n", b"x path=y\n",
                                                                  b"12 pathx\n\n\n\n"]))))
        v.refuse = True
    elif hostile == "dup":
        members.insert(draw(st.integers(i + 1, n)), Member(members[i].name, members[i].data))
        v.refuse = True
    elif hostile == "drop" and i:
        members.pop(i)
        v.refuse = True
    elif hostile == "extra":
        members.insert(i, Member("inductor/zz/extra.bin", b"extra"))
        v.refuse = True
    elif hostile == "manifest_late":
        members.insert(draw(st.integers(1, n - 1)), members.pop(0))
        v.refuse = v.info_refuse = True
    elif hostile == "nonutf8":
        members[i].name = "inductor/ab/\udcff\udcfe.py"
        v.refuse = True
    elif hostile == "flip" and members[i].data:
        d = bytearray(members[i].data)
        d[draw(st.integers(0, len(d) - 1))] ^= draw(st.integers(1, 255))
        members[i].data = bytes(d)
        v.refuse = True
    elif hostile == "pax_traversal":
        members[i].before.append(ext(b"x", pax([(b"path", f"inductor/../../{ESCAPE}".encode())])))
        v.refuse = True
    elif hostile == "longlink_on_file":
        members[i].before.append(ext(b"K", f"/tmp/{ESCAPE}".encode() + b"\0"))
        v.edge = True
    elif hostile == "dir_with_data":
        members.insert(i, Member("inductor/ab/", b"data", type=b"5"))
        v.refuse = True
    if any(m.extended() > 4 for m in members):
        v.refuse = True
    body = b"".join(m.encode() for m in members)
    tail_kind = draw(st.sampled_from(TAILS))
    if tail_kind == "end":
        stream = body + END
    elif tail_kind == "one_block":
        stream = body + END[:512]
        v.edge = True
    elif tail_kind == "none":
        stream = body
        v.refuse = True
    elif tail_kind == "zeros":
        p = draw(st.sampled_from([0, 512, 9216, MiB - 1024, MiB - 512, MiB, MiB + 1, 2 * MiB]))
        stream = body + END + bytes(p)
        desc.append(f"{p} zero bytes after the end blocks")
        if p > MiB:
            v.refuse = True
        elif p + 512 > MiB:
            v.edge = True
    elif tail_kind == "garbage":
        g = draw(st.binary(min_size=1, max_size=600).filter(any))
        stream = body + END + g
        desc.append(f"{len(g)} bytes of data after the end blocks")
        v.refuse = True
    else:
        cut = draw(st.integers(0, len(body) + 511))
        stream = (body + END)[:cut]
        desc.append(f"tar cut at {cut} of {len(body) + 1024}")
        v.refuse = True
        if cut < members[0].encode().__len__():
            v.info_refuse = True
    if v.refuse or hostile not in ("none", "global_ok"):
        v.info_edge = True  # info reads only up to the manifest: what follows may or may not matter
    data = zstandard.ZstdCompressor(level=1).compress(stream)
    return Case("tar", desc, data, v.install_codes(), v.info_codes(), files)


NEST_AT = {"top": 1, "entry_config": 4, "file_info": 3}


def _apply(m: dict, what: str, value) -> None:
    """One change of ``manifest_cases`` to the manifest dict."""
    first = next(iter(m["files"]))
    if what == "size":
        m["files"][first]["size"] = value
    elif what == "sha256":
        m["files"][first]["sha256"] = value
    elif what == "total_bytes":
        m["total_bytes"] = value
    elif what == "format":
        m["format"] = value
    elif what == "files":
        m["files"] = value
    elif what == "entries":
        m["entries"] = value
    elif what == "fingerprint":
        m["entries"][0]["fingerprint"] = value
    elif what == "info":
        m["files"][first] = value
    elif what == "entry_fields":
        m["entries"][0][value] = "not a container"
    elif what == "env":
        for env in [m["environment"]] + [e["environment"] for e in m["entries"]]:
            env[value] = "0.0.0-other"
    elif what == "odd_value":
        where, c = value
        if where == "created":
            m["created"] = f"2026{c}"
        elif where == "extra":
            m[f"note{c}"] = c
        else:
            m["entries"][0].setdefault(where, {})["note"] = f"a{c}b"
    elif what == "big_number":
        m["files"][first]["size"] = "@@big@@"


@st.composite
def manifest_cases(draw) -> Case:
    b = base()
    files = dict(b.files)
    template = json.loads(json.dumps(b.manifest))
    desc, v = [], Verdict()
    in_manifest_only: dict = {}
    raw_edits = []   # (placeholder, raw JSON text)
    post = []        # functions on the manifest dict
    text_edit = None
    kinds = draw(st.lists(st.sampled_from(["nest", "long_names", "many_files", "odd_name", "types", "env",
                                           "odd_value", "encoding", "pad", "big_number", "containers"]),
                          min_size=1, max_size=2, unique=True))
    if "encoding" in kinds and "pad" in kinds:
        kinds.remove("encoding")
    for kind in kinds:
        if kind == "nest":
            d = draw(st.one_of(st.integers(1, 40), st.sampled_from([100, 5000, 200_000])))
            where = draw(st.sampled_from(sorted(NEST_AT)))
            style = draw(st.sampled_from(["list", "dict"]))
            nested = "[" * d + "]" * d if style == "list" else '{"a":' * (d - 1) + "{}" + "}" * (d - 1)
            raw_edits.append((f"@@nest{len(raw_edits)}@@", nested, where))
            desc.append(f"{style}s nested {d} deep in {where}")
            if NEST_AT[where] + d > 32 or d >= 200_000:
                v.refuse = v.info_refuse = True
        elif kind == "long_names":
            count, k = draw(st.integers(1, 1200)), draw(st.integers(1, 2045))
            in_tar = draw(st.booleans()) and count <= 20
            if in_tar:  # one chain of folders, ``count`` files in it
                chain = "inductor/" + "a/" * k
                new = {f"{chain}f{i}": b"" for i in range(count)}
                files.update(new)
            else:  # ``count`` chains
                new = {f"inductor/{i}/" + "a/" * k + "f": b"" for i in range(count)}
                in_manifest_only.update(new)
                v.refuse = True
            desc.append(f"{count} names of {len(next(iter(new)))} chars, {k} one-character folders "
                        f"({'in the tar too' if in_tar else 'manifest only'})")
        elif kind == "many_files":
            count = draw(st.sampled_from([10, 1000, 30_000, 60_000]))
            in_tar = count <= 1000 and draw(st.booleans())
            new = {f"inductor/m/{i}": b"" for i in range(count)}
            (files if in_tar else in_manifest_only).update(new)
            if not in_tar:
                v.refuse = True
            desc.append(f"{count} more files ({'in the tar too' if in_tar else 'manifest only'})")
        elif kind == "odd_name":
            name = draw(names)
            if name in files:
                continue
            files[name] = b"x"
            desc.append(f"file {name[:60]!r} ({len(name)} chars)")
        elif kind == "types":
            what = draw(st.sampled_from(["size", "sha256", "total_bytes", "format", "files", "entries", "fingerprint",
                                         "top", "info", "entry_fields"]))
            value = draw({
                "size": st.sampled_from(["12", 12.0, True, -1, None, 2**63, 10**30, [], {}]),
                "sha256": st.sampled_from(["A" * 64, "0" * 63, "g" * 64, 12, None, "0" * 65]),
                "total_bytes": st.sampled_from([-1, 0, 1, "7531", 7531.0, True, None, 2**64]),
                "format": st.sampled_from(["sd3plugin-cache/2", "", None, 1, ["sd3plugin-cache/1"]]),
                "files": st.sampled_from([[], "x", None, 1, {"inductor/x": []}]),
                "entries": st.sampled_from(["x", {}, [1], [[]], [None]]),
                "fingerprint": st.sampled_from(["", "../x", "a" * 129, None, 7, "ab/cd", ".x", "x\x85"]),
                "top": st.sampled_from([[], "x", 1, None, True]),
                "info": st.sampled_from([[], "x", None, 1]),
                "entry_fields": st.sampled_from(["config", "composed_config", "environment", "shapes", "blobs"]),
            }[what])
            desc.append(f"{what} = {value!r}"[:80])
            post.append((what, value))
            if what == "sha256" and value == "A" * 64:
                v.edge = v.info_edge = True  # upper-case hex: not documented either way
            else:
                v.refuse = v.info_refuse = True
        elif kind == "env":
            key = draw(st.sampled_from(["torch", "python", "machine"]))  # triton: not checked for CPU caches
            post.append(("env", key))
            desc.append(f"environment {key} of another machine")
            v.incompatible = True
        elif kind == "odd_value":  # odd characters in values (not names): data, never an error
            c = draw(st.sampled_from([0x85, 0x9B, 0x00, 0x1B, 0xD800, 0xDFFF, 0x202E, 0x10FFFF]))
            where = draw(st.sampled_from(["created", "config", "composed_config", "extra"]))
            post.append(("odd_value", (where, chr(c))))
            desc.append(f"U+{c:04X} in the {where} value")
            if 0xD800 <= c <= 0xDFFF:  # a lone surrogate anywhere: refusing it is fine too (issue 20, item 8)
                v.edge = v.info_edge = True
        elif kind == "encoding":
            text_edit = draw(st.sampled_from(["ascii", "utf8", "indent", "bom", "utf16", "crlf", "nul",
                                              "dup_key", "trailing_comma"]))
            desc.append(f"manifest encoding {text_edit}")
            if text_edit in ("bom", "utf16", "nul", "dup_key"):
                v.edge = v.info_edge = True
            elif text_edit == "trailing_comma":
                v.refuse = v.info_refuse = True
        elif kind == "pad":
            total = draw(st.sampled_from([4 * MiB - 1, 4 * MiB, 4 * MiB + 1, 5 * MiB]))
            text_edit = ("pad", total)
            desc.append(f"manifest padded to {total} bytes")
            if total > 4 * MiB:
                v.refuse = v.info_refuse = True
        elif kind == "big_number":
            digits = draw(st.sampled_from([20, 400, 4301, 20_000]))
            post.append(("big_number", digits))
            desc.append(f"a size of {digits} digits")
            v.refuse = v.info_refuse = True
        elif kind == "containers":
            count = draw(st.sampled_from([1000, 199_000, 200_001, 400_000]))
            raw_edits.append((f"@@nest{len(raw_edits)}@@", "[" + ",".join(["[]"] * count) + "]", "top"))
            desc.append(f"{count} empty arrays")
            if count + 10 > 200_000:
                v.edge = v.info_edge = True
                if count > 200_000:
                    v.refuse = v.info_refuse = True
    listed = {**files, **in_manifest_only}
    _names_verdict(v, listed, desc)
    if _pristine_clash(listed):
        v.clash_8 = True
    m = manifest_for(listed, template)
    for ph, _, where in raw_edits:
        if where == "top":
            m[ph] = ph
        elif where == "entry_config":
            m["entries"][0]["config"][ph] = ph
        else:
            m["files"][next(iter(m["files"]))][ph] = ph
    post.sort(key=lambda p: p[0] in ("top", "files", "entries", "info"))
    for what, value in post:
        if what == "top":
            m = {"@@top@@": value}
            continue
        try:
            _apply(m, what, value)
        except (KeyError, TypeError, IndexError, AttributeError, StopIteration):
            pass  # an earlier change removed what this one changes (both are refused)
    if "@@top@@" in m:
        text = json.dumps(m["@@top@@"])
    elif text_edit in ("ascii", "utf8", "indent", "crlf", "nul", "dup_key", "trailing_comma", "bom", "utf16"):
        text = json.dumps(m, ensure_ascii=text_edit != "utf8", indent=2 if text_edit in ("indent", "crlf") else None)
    else:
        text = json.dumps(m)
    for ph, raw, _ in raw_edits:
        text = text.replace(f'"{ph}": "{ph}"', f'"{ph}": {raw}', 1)
    for what, value in post:
        if what == "big_number":
            text = text.replace('"@@big@@"', "1" + "0" * (value - 1), 1)
    if text_edit == "crlf":
        text = text.replace("\n", "\r\n")
    elif text_edit == "dup_key":
        text = '{"files": {}, ' + text[1:]
    elif text_edit == "trailing_comma":
        text = text[:-1] + ",}"
    data = text.encode("utf-8", "surrogatepass")
    if text_edit == "bom":
        data = b"\xef\xbb\xbf" + data
    elif text_edit == "utf16":
        data = text.encode("utf-16", "surrogatepass")
    elif text_edit == "nul":
        data += b"\0" * 3
    elif isinstance(text_edit, tuple):
        data += b" " * max(0, text_edit[1] - len(data))
        if len(data) > 4 * MiB:
            v.refuse = v.info_refuse = True
        else:
            v.refuse = v.refuse  # size alone keeps it valid
    if len(data) > 4 * MiB:
        v.refuse = v.info_refuse = True
    members = [Member("manifest.json", data, dialect="ustar")]
    members += [Member(n, d, dialect="gnu" if len(raw_name(n)) > 100 else "ustar") for n, d in files.items()]
    stream = tar_stream(members)
    cctx = zstandard.ZstdCompressor(level=1)
    return Case("manifest", desc, cctx.compress(stream), v.install_codes(), v.info_codes(), files)


def skippable(nibble: int, payload: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<II", 0x184D2A50 | nibble, len(payload) if declared is None else declared) + payload


def frame(data: bytes, mode: str, level: int, checksum: bool, window_log: int) -> bytes:
    if mode == "oneshot":
        return zstandard.ZstdCompressor(level=level, write_checksum=checksum).compress(data)
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log,
                                                             enable_ldm=window_log > 27,
                                                             write_checksum=checksum)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(data)
    return buf.getvalue()


@st.composite
def zstd_cases(draw) -> Case:
    b = base()
    files = dict(b.files)
    m = manifest_for(files, b.manifest)
    members = [Member("manifest.json", dumps(m))] + [Member(n, d) for n, d in files.items()]
    body = tar_stream(members, b"")
    stream = body + END
    need = len(body) + 512  # a reader needs the stream up to the first end block
    v, desc = Verdict(), []
    cuts = sorted(set(draw(st.lists(st.integers(1, len(stream) - 1), max_size=3))))
    bounds = [0] + cuts + [len(stream)]
    frames, spans = [], []
    for k in range(len(bounds) - 1):
        mode = draw(st.sampled_from(["oneshot", "oneshot", "stream"]))
        wlog = draw(st.one_of(st.integers(10, 25), st.integers(26, 31))) if mode == "stream" else 0
        f = frame(stream[bounds[k]:bounds[k + 1]], mode, draw(st.integers(1, 3)), draw(st.booleans()), wlog)
        window = zstandard.get_frame_parameters(f).window_size
        if window > 32 * MiB:
            v.refuse = True
            if k == 0:
                v.info_refuse = True
            desc.append(f"frame {k} declares a {window >> 20} MiB window")
        frames.append(f)
        spans.append((bounds[k], bounds[k + 1]))
    desc.append(f"{len(frames)} data frame(s)")
    skips = draw(st.lists(st.tuples(st.integers(0, len(frames)), st.integers(0, 15),
                                    st.sampled_from(["empty", "zeros", "bytes", "big_zeros", "lie"])), max_size=2))
    slots: dict = {}
    for slot, nibble, kind in skips:
        payload = {"empty": b"", "zeros": bytes(100), "bytes": bytes(range(256)) * 4, "big_zeros": bytes(256 * 1024),
                   "lie": b"abc"}[kind]
        slots.setdefault(slot, []).append(skippable(nibble, payload, 2**31 if kind == "lie" else None))
        where = "before" if slot == 0 else "after" if slot == len(frames) else "between"
        desc.append(f"skippable frame ({kind}) {where} the data frames")
        v.refuse = True  # issue 20, item 3: frames that are not data are refused
        v.info_edge = True
    out, ends = b"", []
    for k, f in enumerate(frames):
        out += b"".join(slots.get(k, []))
        out += f
        ends.append(len(out))
    out += b"".join(slots.get(len(frames), []))
    tail = draw(st.sampled_from(["none", "none", "garbage", "zero_frame", "data_frame", "partial_frame",
                                 "truncate"]))
    if tail == "garbage":
        g = draw(st.binary(min_size=1, max_size=64))
        out += g
        desc.append(f"{len(g)} bytes after the last frame")
        v.refuse = True
    elif tail == "zero_frame":
        p = draw(st.sampled_from([1, 512, MiB - 512, MiB + 1, 2 * MiB]))
        out += zstandard.ZstdCompressor(level=1).compress(bytes(p))
        desc.append(f"a frame of {p} zero bytes after the stream")
        if p > MiB:
            v.refuse = True
        elif p + 512 > MiB:
            v.edge = True
    elif tail == "data_frame":
        out += zstandard.ZstdCompressor(level=1).compress(b"evil" * draw(st.integers(1, 300)))
        desc.append("a frame of data after the stream")
        v.refuse = True
    elif tail == "partial_frame":
        f = zstandard.ZstdCompressor(level=1).compress(bytes(2000))
        out += f[:draw(st.integers(1, len(f) - 1))]
        desc.append("part of a frame after the stream")
        v.refuse = True
    elif tail == "truncate":
        cut = draw(st.integers(0, len(out) - 1))
        desc.append(f"cut at {cut} of {len(out)} bytes")
        # the frame holding byte ``need - 1`` of the tar stream must be whole
        k_need = next(k for k, (s, e) in enumerate(spans) if s < need <= e)
        if cut < ends[k_need]:
            v.refuse = True
        else:
            v.edge = True
        out = out[:cut]
        v.info_edge = True
    if v.refuse and not v.info_refuse:
        v.info_edge = True
    return Case("zstd", desc, out, v.install_codes(), v.info_codes(), files)


SAMPLES = ("pax_valid", "skippable_between", "c1_name", "long_names_100", "trailing_data", "gnu_sparse")


def sample_cases() -> dict:
    """Fixed inputs of each family, for the real executable."""
    b = base()
    files = dict(b.files)

    def archive(files: dict, manifest: dict, dialect: str = "ustar", tail: bytes = END, sparse: bool = False):
        members = [Member("manifest.json", dumps(manifest), dialect=dialect)]
        members += [Member(n, d, dialect=dialect) for n, d in files.items()]
        if sparse:
            members[-1].type = b"S"
        return tar_stream(members, tail)

    def z(stream: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=1).compress(stream)

    m = manifest_for(files, b.manifest)
    stream = archive(files, m)
    half = len(stream) // 2
    c1 = {**files, "inductor/zz/a\x85b": b"x"}
    long = {f"inductor/{i}/" + "a/" * 2040 + "f": b"" for i in range(100)}
    ok, bad, either = frozenset({OK}), frozenset({CORRUPT}), frozenset({OK, CORRUPT})
    return {
        "pax_valid": Case("sample", ["every member named by a PAX header"], z(archive(files, m, "pax")), ok, ok, files),
        "skippable_between": Case("sample", ["a skippable frame between two data frames"],
                                  z(stream[:half]) + skippable(0, bytes(64)) + z(stream[half:]), bad, either, files),
        "c1_name": Case("sample", ["a file name with U+0085"], z(archive(c1, manifest_for(c1, b.manifest))), bad, bad,
                        c1),
        "long_names_100": Case("sample", ["100 names of 4,092 characters in one-character folders, manifest only"],
                               z(archive(files, manifest_for({**files, **long}, b.manifest))), bad, either, files),
        "trailing_data": Case("sample", ["data after the end blocks"], z(stream + b"evil"), bad, ok, files),
        "gnu_sparse": Case("sample", ["a GNU sparse member"], z(archive(files, m, sparse=True)), bad, ok, files),
    }


# -- the worker: the CLI's main in one long-lived process ---------------------------------------------------
WORKER = r"""
import contextlib, ctypes, gc, io, json, logging, os, sys, threading, time
try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    trim = lambda pad: 0
reply_fd, KILL_KB = int(sys.argv[1]), int(sys.argv[2]) * 1024
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
lock = threading.Lock()
def reply(obj):
    data = (json.dumps(obj) + "\n").encode()
    with lock:
        while data:
            data = data[os.write(reply_fd, data):]
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
cpu_deadline = [None]
def watchdog():  # past the RSS or CPU limit: no need to wait for the end (the machine is shared)
    with open("/proc/self/statm", "rb", buffering=0) as f:
        while True:
            f.seek(0)
            rss = int(f.read().split()[1]) * PAGE_KB
            if rss > KILL_KB:
                reply({"killed": "rss", "rss_mb": rss / 1024})
                os._exit(70)
            d = list(cpu_deadline)
            if d[0] is not None and time.process_time() > d[0]:
                reply({"killed": "cpu", "cpu_s": time.process_time() - d[1]})
                os._exit(71)
            time.sleep(0.005)
threading.Thread(target=watchdog, daemon=True).start()
class _Stderr(logging.Handler):  # logging follows redirect_stderr, as the CLI's goes to its stderr
    def emit(self, record):
        sys.stderr.write(self.format(record) + "\n")
logging.getLogger().addHandler(_Stderr())
logging.getLogger().setLevel(logging.INFO)
from sd3plugin.cli.cache import main
low = [1 << 40]  # the lowest RSS after a command (kB)
for line in sys.stdin:
    argv, cpu_limit = json.loads(line)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    o, e = io.StringIO(), io.StringIO()
    c0, t0 = time.process_time(), time.perf_counter()
    cpu_deadline[:] = [c0 + cpu_limit, c0]
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = "raised " + repr(exc)[:300]
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    cpu_deadline[:] = [None]
    if status_kb("VmRSS:") > low[0] + 32 * 1024:  # freed memory back to the system (slow: only when grown)
        gc.collect()
        trim(0)
    low[0] = min(low[0], status_kb("VmRSS:"))
    err = e.getvalue()
    reply({"code": code, "stderr": err[-3000:], "stderr_lines": len(err.strip().splitlines()),
           "stdout": o.getvalue()[:3000], "peak_mb": status_kb("VmHWM:") / 1024,
           "rss_mb": status_kb("VmRSS:") / 1024, "cpu_s": cpu, "wall_s": wall})
"""


MEASURE = r"""
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, errors="replace")
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": p.returncode, "stderr": p.stderr[-3000:], "stderr_lines": len(p.stderr.strip().splitlines()),
                  "stdout": p.stdout[:3000], "peak_mb": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}))
"""
REAL_STARTUP_S = 15.0  # CPU seconds a fresh CLI process may spend importing (torch) on a loaded machine


class Worker:
    def __init__(self, env: dict, log: Path, warmup: list[list[str]]):
        self.env, self.log, self.warmup = env, log, warmup
        self.proc = None
        self.baseline_mb = None
        self.restarts = 0

    def start(self) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(RSS_KILL_MB)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), pass_fds=(w,),
                                     env=self.env, text=True, cwd=self.env["HOME"])
        os.close(w)
        self.r, self.buf = r, b""
        for argv in self.warmup:  # imports and first-use costs are paid here, as a fresh CLI pays them
            res = self._call(argv, 120)
            assert res.get("code") == 0, res
        self.baseline_mb = res["rss_mb"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            os.close(self.r)
            self.proc = None
            self.restarts += 1

    def _call(self, argv, wall_s, cpu_s=600.0) -> dict:
        self.proc.stdin.write(json.dumps([argv, cpu_s]) + "\n")
        self.proc.stdin.flush()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.r], [], [], wall_s)
            if not ready:
                return {"killed": "time", "wall_s": wall_s}
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                return {"killed": "died", "returncode": self.proc.poll()}
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, argv, wall_s, cpu_s) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        try:
            res = self._call(argv, wall_s, cpu_s)
        except (BrokenPipeError, OSError):
            res = {"killed": "died"}
        if "killed" in res or res.get("rss_mb", 0) > self.baseline_mb + 64:
            self.stop()  # a fresh process for the next command, as the CLI is
        return res


def time_bound(size: int) -> float:
    return TIME_BASE_S + TIME_PER_BYTE_S * size


class Harness:
    """A sandbox: a pristine installed cache, a work copy the commands run on, the archive beside it."""

    def __init__(self, root: Path, base_archive: Path):
        self.root = root
        self.pristine = root / "pristine" / "cache"
        self.ex = root / "ex"
        self.cache = self.ex / "work" / "cache"
        self.archive = self.ex / "archive.tar.zst"
        self.tmp = self.ex / "tmp"
        self.failures = root / "failures"
        for p in (self.ex / "work", self.tmp, self.failures, root / "home"):
            p.mkdir(parents=True)
        assert cli("install", str(base_archive), "--cache-dir", str(self.pristine))[0] == 0
        (self.pristine / "entries" / "ffffeeeeddddcccc").mkdir()
        (self.pristine / "entries" / "ffffeeeeddddcccc" / "entry.json").write_text(
            json.dumps({"fingerprint": "ffffeeeeddddcccc", "config": {}, "shapes": []}))
        self.pristine_tree = tree(self.pristine)
        PRISTINE_FILES[:] = [{k for k, v in self.pristine_tree.items() if v != "dir"}]
        shutil.copytree(self.pristine, self.cache, symlinks=True)
        self.top = sorted(os.listdir(root))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SD3PLUGIN_")}
        env.update(PYTHONPATH=str(ROOT), TMPDIR=str(self.tmp), HOME=str(root / "home"),
                   SD3PLUGIN_CACHE_DIR=str(self.cache), HF_HUB_OFFLINE="1")
        warm = root.parent / "warm"
        self.worker = Worker(env, root.parent / "worker.log",
                             [["info", str(base_archive), "--json"],
                              ["install", str(base_archive), "--cache-dir", str(warm / "cache"), "--json"]])
        self.worker.start()
        self.count = 0

    def close(self):
        self.worker.stop()

    def run(self, argv: list[str], size: int) -> dict:
        bound = time_bound(size)
        res = self.worker.call(argv, wall_s=4 * bound + 30, cpu_s=bound + 1)
        res["bound_s"] = bound
        return res

    def run_real(self, argv: list[str], size: int) -> dict:
        """``argv`` through the installed ``sd3plugin-cache`` in a fresh process, measured by a small parent
        (``ru_maxrss`` of its children: the parent's own RSS at fork is far below the limit)."""
        exe = shutil.which("sd3plugin-cache", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "sd3plugin.cli.cache"]
        bound = time_bound(size) + REAL_STARTUP_S
        try:
            p = subprocess.run([sys.executable, "-c", MEASURE, *cmd, *argv], capture_output=True, text=True,
                               env=self.worker.env, cwd=self.worker.env["HOME"], timeout=4 * bound + 30)
        except subprocess.TimeoutExpired:
            return {"killed": "time", "wall_s": 4 * bound + 30}
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout)
        res["bound_s"] = bound
        return res

    def check(self, case: Case, real: tuple = ()) -> None:
        """Install ``case`` into the work copy of the cache and show its info, through the worker or (the
        commands named in ``real``) the real executable; then every promise."""
        self.count += 1
        self.archive.write_bytes(case.data)
        archive_sha = hashlib.sha256(case.data).hexdigest()
        run = {c: self.run_real if c in real else self.run for c in ("install", "info")}
        install = run["install"](["install", str(self.archive), "--cache-dir", str(self.cache), "--json",
                                  "--lock-timeout", "5"], len(case.data))
        after = tree(self.cache)
        outside = self._outside(archive_sha)
        info = run["info"](["info", str(self.archive), "--json"], len(case.data))
        info_outside = self._outside(archive_sha)
        info_cache = tree(self.cache) == after
        where = self._keep(case) if not self._fine(case, install, info, after) else ""
        try:
            for cmd, res, allowed in (("install", install, case.install), ("info", info, case.info)):
                self._assert_result(cmd, res, allowed, case, where)
            assert not outside, f"install wrote outside the cache dir: {outside}{where}"
            assert not info_outside and info_cache, f"info wrote something: {info_outside}{where}"
            if install.get("code") == OK:
                self._assert_installed(case, after, where)
            else:
                assert after == self.pristine_tree, \
                    f"refused (exit {install.get('code')}) but the cache tree changed: " \
                    f"{_diff(self.pristine_tree, after)}{where}"
        finally:
            if after != self.pristine_tree:
                shutil.rmtree(self.cache, ignore_errors=True)
                shutil.copytree(self.pristine, self.cache, symlinks=True)

    @staticmethod
    def _fine(case, install, info, after) -> bool:
        return (install.get("code") in case.install and info.get("code") in case.info
                and install.get("stderr_lines", 0) <= 1 and info.get("stderr_lines", 0) <= 1
                and max(install.get("peak_mb", 1e9), info.get("peak_mb", 1e9)) <= RSS_LIMIT_MB)

    def _keep(self, case: Case) -> str:
        name = f"{case.family}-{hashlib.sha256(case.data).hexdigest()[:12]}.tar.zst"
        path = self.failures / name
        path.write_bytes(case.data)
        return f"\n  archive kept: {path}\n  case: {case!r}"

    def _outside(self, archive_sha: str) -> list[str]:
        wrong = []
        if sorted(os.listdir(self.root)) != self.top:
            wrong.append(f"{self.root}: {sorted(os.listdir(self.root))}")
        if sorted(os.listdir(self.ex)) != ["archive.tar.zst", "tmp", "work"]:
            wrong.append(f"{self.ex}: {sorted(os.listdir(self.ex))}")
        if os.listdir(self.ex / "work") != ["cache"]:
            wrong.append(f"{self.ex / 'work'}: {os.listdir(self.ex / 'work')}")
        if os.listdir(self.tmp):
            wrong.append(f"TMPDIR: {os.listdir(self.tmp)}")
        if hashlib.sha256(self.archive.read_bytes()).hexdigest() != archive_sha:
            wrong.append("the archive itself changed")
        if os.path.lexists(f"/tmp/{ESCAPE}"):
            wrong.append(f"/tmp/{ESCAPE}")
        return wrong

    def _assert_result(self, cmd: str, res: dict, allowed: frozenset, case: Case, where: str) -> None:
        killed = res.get("killed")
        if killed == "rss":
            raise AssertionError(f"{cmd}: RSS over {RSS_KILL_MB} MB (the worker was stopped at "
                                 f"{res['rss_mb']:.0f} MB; the limit is {RSS_LIMIT_MB} MB){where}")
        assert killed != "cpu", (f"{cmd}: over {res['cpu_s']:.1f} s CPU for a {len(case.data)}-byte archive "
                                 f"(bound {res['bound_s']:.1f} s; stopped){where}")
        assert killed != "time", f"{cmd}: no answer within {res['wall_s']:.0f} s wall time{where}"
        assert not killed, f"{cmd}: the process died ({res}){where}"
        code = res["code"]
        assert code in allowed, (f"{cmd}: exit {code}, expected one of {sorted(allowed)}: "
                                 f"{res['stderr'].strip()[-500:]}{where}")
        if code != OK:
            assert res["stderr_lines"] == 1 and "Traceback" not in res["stderr"], \
                f"{cmd}: not one line on stderr: {res['stderr'][-800:]!r}{where}"
        else:
            assert "Traceback" not in res["stderr"], f"{cmd}: a traceback: {res['stderr'][-800:]}{where}"
        assert res["peak_mb"] <= RSS_LIMIT_MB, f"{cmd}: peak RSS {res['peak_mb']:.0f} MB{where}"
        assert res["cpu_s"] <= res["bound_s"], \
            f"{cmd}: {res['cpu_s']:.1f} s CPU for a {len(case.data)}-byte archive (bound {res['bound_s']:.1f} s){where}"

    def _assert_installed(self, case: Case, after: dict, where: str) -> None:
        for name, data in case.files.items():
            if name.endswith("/entry.json"):
                continue  # merged with the installed entry's
            p = self.cache / name
            assert p.is_file() and p.read_bytes() == data, f"installed {name!r} is not the archive's{where}"
        allowed = set(self.pristine_tree) | set(case.files) | {"installed.json", "checksums.json", ".lock"}
        for name in case.files:
            allowed.update("/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1))
        extra = sorted(set(after) - allowed)
        assert not extra, f"install left what the archive does not list: {extra[:5]}{where}"


def _diff(a: dict, b: dict) -> str:
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(changed[:6]) + (f" (+{len(changed) - 6})" if len(changed) > 6 else "")


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = make_cache(root / "src")
    archive = root / "base.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(archive))[0] == 0
    shutil.rmtree(src)
    BASE[:] = [read_archive(archive.read_bytes())]
    BASE_ARCHIVE[:] = [archive]
    h = Harness(root / "sandbox", archive)
    yield h
    h.close()


# -- fast lane -----------------------------------------------------------------------------------------------
@_settings(FAST["tar"])
@given(case=tar_cases())
def test_tar_streams(fuzz, case):
    fuzz.check(case)


@_settings(FAST["manifest"])
@given(case=manifest_cases())
def test_manifests(fuzz, case):
    fuzz.check(case)


@_settings(FAST["zstd"])
@given(case=zstd_cases())
def test_zstd_framing(fuzz, case):
    fuzz.check(case)


def test_a_sample_through_the_real_executable(fuzz):
    """The worker measures what the real CLI does: a valid archive's info and a hostile one's install."""
    cases = sample_cases()
    fuzz.check(cases["pax_valid"], real=("info",))
    fuzz.check(cases["skippable_between"], real=("install",))


# -- slow lane: 10,000+ inputs ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(2400)  # 10,200 inputs on 2 cores: longer than the lane's 900 s per test
def test_fuzz_long(fuzz, tmp_path_factory):
    """The three families at once (``SLOW`` inputs each), one thread and one worker process each, so the
    run uses both cores of the CI machine. A family's failure is reported with hypothesis' minimal example."""
    strategies = {"tar": tar_cases(), "manifest": manifest_cases(), "zstd": zstd_cases()}
    harness = {name: Harness(tmp_path_factory.mktemp(f"fuzz-{name}") / "sandbox", BASE_ARCHIVE[0])
               for name in strategies}
    errors: dict = {}

    def run(name: str) -> None:
        @_settings(SLOW[name])
        @given(case=strategies[name])
        def family(case):
            harness[name].check(case)

        try:
            family()
        except BaseException as exc:  # noqa: BLE001 - reported below with hypothesis' notes
            errors[name] = "".join(traceback.format_exception(exc))[-20000:]
        finally:
            harness[name].close()

    threads = [threading.Thread(target=run, args=(name,), name=f"fuzz-{name}") for name in strategies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {name: h.count for name, h in harness.items()}
    assert not errors, f"inputs run: {counts}\n" + "\n\n".join(f"== {k} ==\n{v}" for k, v in errors.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLES)
def test_samples_through_the_real_executable_long(fuzz, name):
    fuzz.check(sample_cases()[name], real=("install", "info"))
