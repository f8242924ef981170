"""Hostile archives, full disks, kills and races (issue 13), without compiling.

- a generated corpus of hostile or broken archives: each refused with its exit code and a one-line message,
  the cache tree unchanged byte for byte, nothing written outside it, and the peak memory of the process
  that ran them all under 400 MB (one fresh process, ``ru_maxrss`` after each case);
- SIGKILL at random points of install (and at every rename of its commit): the cache is the old or the new
  one, and the next command recovers;
- a failure at every rename of the commit leaves the cache exactly as it was;
- disk full on a small tmpfs (in a private mount namespace; skipped where the machine does not allow it);
- warm and install serialized without lost work; signed archives; damaged cache files rebuilt; leftovers.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zstandard

from sd3plugin.cache import store
from sd3plugin.cache.lock import maintain
from sd3plugin.transforms.settings import activate
from sd3plugin.cache import archive_scan, install as install_mod, pack as pack_mod, tar_reader
from sd3plugin.cache.archive import FORMAT, MANIFEST
from sd3plugin.cache.manifest import environment
from sd3plugin.cli.exit_codes import EXIT

from .test_cache_archive import FP, cli, make_cache

RSS_LIMIT_MB = 400
GiB = 2**30


# -- raw tar / zstd building blocks ------------------------------------------------------------------
def tar_header(name: str, size: int = 0, type_: bytes = b"0", mode: int = 0o644, linkname: str = "",
               size_field: bytes | None = None, magic: bytes = b"ustar\x0000", prefix: str = "",
               bad_checksum: bool = False) -> bytes:
    b = bytearray(512)
    raw = name.encode("utf-8", "surrogateescape")[:100]
    b[0:len(raw)] = raw
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b"%07o\0" % 0
    b[116:124] = b"%07o\0" % 0
    if size_field is None:
        size_field = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    b[124:136] = size_field
    b[136:148] = b"%011o\0" % 0
    b[156:157] = type_
    b[157:157 + len(linkname)] = linkname.encode()
    b[257:265] = magic
    b[345:345 + len(prefix)] = prefix.encode()
    b[148:156] = b" " * 8
    chk = sum(b) + (1 if bad_checksum else 0)
    b[148:156] = b"%06o\0 " % chk
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: str, data: bytes, type_: bytes = b"0", **kw) -> bytes:
    return tar_header(name, len(data), type_, **kw) + pad(data)


def pax_records(records: dict) -> bytes:
    out = b""
    for k, v in records.items():
        body = f" {k}={v}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


END = b"\0" * 1024


def zst(*parts: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(b"".join(parts))


def good_files() -> dict[str, bytes]:
    return {f"entries/{FP}/entry.json": json.dumps({"fingerprint": FP, "environment": environment(),
                                                    "config": {"device": "cpu"}, "shapes": []}).encode(),
            "inductor/zz/kernel.py": b"print('hi')\n"}


def manifest_for(files: dict[str, bytes], **extra) -> dict:
    m = {"format": FORMAT, "environment": environment(),
         "entries": [{"fingerprint": FP, "environment": environment(), "config": {"device": "cpu"}, "shapes": []}],
         "files": {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in files.items()},
         "total_bytes": sum(len(v) for v in files.values())}
    m.update(extra)
    return m


def manifest_member(manifest: dict | bytes) -> bytes:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return member(MANIFEST, data)


def plain_archive(files: dict[str, bytes] | None = None, manifest: dict | None = None, extra: bytes = b"",
                  before: bytes = b"") -> bytes:
    files = good_files() if files is None else files
    manifest = manifest_for(files) if manifest is None else manifest
    return zst(manifest_member(manifest), before, *(member(k, v) for k, v in files.items()), extra, END)


def zstd_bomb(path: Path, manifest_size: int, header_size: int, zeros: int) -> None:
    """One zstd frame: manifest, a member header declaring ``header_size``, then ``zeros`` zero bytes."""
    files = good_files()
    files_m = manifest_for(files)
    files_m["files"]["inductor/zz/bomb.bin"] = {"size": manifest_size, "sha256": hashlib.sha256(b"").hexdigest()}
    files_m["total_bytes"] += manifest_size
    head = manifest_member(files_m) + b"".join(member(k, v) for k, v in files.items())
    head += tar_header("inductor/zz/bomb.bin", header_size)
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as w:
        w.write(head)
        block = bytes(16 << 20)
        left = zeros
        while left:
            w.write(block[:min(left, len(block))])
            left -= min(left, len(block))
        w.write(END)


# -- the corpus -----------------------------------------------------------------------------------------
def _corpus() -> dict:
    """name -> (builder(path), exit code name, message fragment). Builders write the archive at ``path``."""
    C = {}

    def raw(name, code, msg, make):
        C[name] = (lambda p, make=make: p.write_bytes(make()), code, msg)

    files = good_files()
    m = manifest_for(files)
    body = b"".join(member(k, v) for k, v in files.items())
    mm = manifest_member(m)
    # 1. headers that would be read whole into memory by tarfile
    raw("gnu_longname_1GiB", "corrupt", "GNU long-name header of 1073741824 bytes",
        lambda: zst(mm, tar_header("././@LongLink", GiB, b"L"), b"x" * 262144))
    raw("gnu_longname_2GiB", "corrupt", "GNU long-name header of 2147483648 bytes",
        lambda: zst(mm, tar_header("././@LongLink", 2 * GiB, b"L"), b"x" * 262144))
    raw("gnu_longlink_1GiB", "corrupt", "GNU long-link header of 1073741824 bytes",
        lambda: zst(mm, tar_header("././@LongLink", GiB, b"K")))
    raw("pax_1GiB", "corrupt", "a PAX header of 1073741824 bytes",
        lambda: zst(mm, tar_header("pax", GiB, b"x"), b"9 a=bbbb\n" * 1000))
    raw("pax_global_1GiB", "corrupt", "global PAX header of 1073741824 bytes",
        lambda: zst(tar_header("pax", GiB, b"g"), b"0" * 1024))
    raw("longname_first_1GiB", "corrupt", "GNU long-name header of 1073741824 bytes",
        lambda: zst(tar_header("././@LongLink", GiB, b"L"), b"a" * 4096))
    raw("too_many_extended_headers", "corrupt", "more than 4 extended headers",
        lambda: zst(mm, *(member("pax", pax_records({"comment": "x" * 100}), b"x") for _ in range(6)), body, END))
    raw("pax_global_sets_path", "corrupt", "global PAX header that sets 'path'",
        lambda: zst(member("g", pax_records({"path": "inductor/zz/evil"}), b"g"), mm, body, END))
    raw("pax_malformed", "corrupt", "malformed PAX header",
        lambda: zst(mm, member("pax", b"99999 path=x\n", b"x"), body, END))
    # 2. sparse members and sizes
    raw("gnu_sparse_16GiB", "corrupt", "GNU sparse file",
        lambda: zst(mm, tar_header("inductor/zz/kernel.py", 16 * GiB, b"S"), END))
    raw("pax_sparse", "corrupt", "GNU sparse file",
        lambda: zst(mm, member("pax", pax_records({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                   "GNU.sparse.realsize": str(GiB)}), b"x"), body, END))
    raw("declared_size_over_manifest", "corrupt", "declares 1073741824 bytes, the manifest 12",
        lambda: zst(mm, member(f"entries/{FP}/entry.json", files[f"entries/{FP}/entry.json"]),
                    tar_header("inductor/zz/kernel.py", GiB), b"\0" * 4096))
    raw("pax_size_over_manifest", "corrupt", "declares 5368709120 bytes, the manifest 12",
        lambda: zst(mm, member(f"entries/{FP}/entry.json", files[f"entries/{FP}/entry.json"]),
                    member("pax", pax_records({"size": str(5 * GiB)}), b"x"),
                    tar_header("inductor/zz/kernel.py", 12), b"\0" * 4096))
    raw("declared_size_under_manifest", "corrupt", "declares 3 bytes, the manifest 12",
        lambda: zst(mm, member(f"entries/{FP}/entry.json", files[f"entries/{FP}/entry.json"]),
                    member("inductor/zz/kernel.py", b"abc"), END))
    raw("negative_size", "corrupt", "negative size",
        lambda: zst(mm, tar_header("inductor/zz/kernel.py", size_field=b"\xff" * 12), END))
    C["zstd_bomb_consistent_manifest"] = (lambda p: zstd_bomb(p, GiB, GiB, GiB), "corrupt", "a decompression bomb")
    C["zstd_bomb_inconsistent_manifest"] = (lambda p: zstd_bomb(p, 10, GiB, GiB), "corrupt",
                                            "declares 1073741824 bytes, the manifest 10")
    def huge_window():
        buf = io.BytesIO()
        params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True)
        with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
            w.write(mm + body + END)  # no content size in the frame: it declares a 2 GiB window
        return buf.getvalue()

    raw("zstd_window_2GiB", "corrupt", "window over 32 MiB", huge_window)
    # 3. malformed manifests
    raw("manifest_nested_200k", "corrupt", "nested too deeply",
        lambda: zst(manifest_member(b"[" * 200_000 + b"]" * 200_000), body, END))
    raw("manifest_nested_40", "corrupt", "nested over 32 levels",
        lambda: zst(manifest_member(json.dumps({**m, "x": json.loads("[" * 40 + "]" * 40)}).encode()), body, END))
    raw("manifest_files_is_a_list", "corrupt", "manifest has no file list",
        lambda: zst(manifest_member({**m, "files": ["a"]}), body, END))
    raw("manifest_size_is_a_string", "corrupt", "no valid size and sha256",
        lambda: zst(manifest_member({**m, "files": {k: {"size": str(v["size"]), "sha256": v["sha256"]}
                                                    for k, v in m["files"].items()}}), body, END))
    raw("manifest_entries_not_objects", "corrupt", "no valid entry list",
        lambda: zst(manifest_member({**m, "entries": [1, 2]}), body, END))
    raw("manifest_environment_nested", "corrupt", "no valid environment",
        lambda: zst(manifest_member({**m, "environment": {"torch": {"x": 1}}}), body, END))
    raw("manifest_total_bytes_lies", "corrupt", "declares total_bytes 1",
        lambda: zst(manifest_member({**m, "total_bytes": 1}), body, END))
    raw("manifest_over_limit", "corrupt", "over the limit of 4194304 bytes",
        lambda: zst(tar_header(MANIFEST, 64 * 2**20), b"{" * 8192))
    raw("manifest_too_many_containers", "corrupt", "over 200000 JSON objects",
        lambda: zst(manifest_member(json.dumps({**m, "x": [[] for _ in range(250_000)]}).encode()), body, END))
    raw("manifest_near_limit_member_missing", "corrupt", "file(s) of the manifest are missing",
        lambda: zst(manifest_member(json.dumps({**m, "x": ["ab"] * 690_000}).encode()),
                    member(f"entries/{FP}/entry.json", files[f"entries/{FP}/entry.json"]), END))
    raw("manifest_not_json", "corrupt", "not valid JSON", lambda: zst(manifest_member(b"\xff{not json"), body, END))
    raw("manifest_wrong_format", "corrupt", "is not 'sd3plugin-cache/1'",
        lambda: zst(manifest_member({**m, "format": "other/9"}), body, END))
    raw("manifest_unsafe_name", "corrupt", "unsafe archive member 'inductor/../../x'",
        lambda: zst(manifest_member(manifest_for({**files, "inductor/../../x": b"x"})), body, END))
    raw("manifest_inductor_is_a_file", "corrupt", "lists 'inductor' as a file",
        lambda: plain_archive({f"entries/{FP}/entry.json": files[f"entries/{FP}/entry.json"], "inductor": b"x"}))
    raw("manifest_entry_without_entry_json", "corrupt", "without its entries/",
        lambda: plain_archive({"inductor/zz/kernel.py": b"x"}))
    raw("manifest_files_of_unknown_entry", "corrupt", "of an entry it does not describe",
        lambda: plain_archive({**files, "entries/feedfeedfeedfeed/entry.json": b"{}"}))
    # 4. streams and members
    raw("empty_file", "corrupt", "an empty file", lambda: b"")
    raw("empty_tar", "corrupt", "the archive is empty", lambda: zst(END))
    raw("random_bytes", "corrupt", "not a zstd-compressed", lambda: random.Random(1).randbytes(5000))
    raw("no_end_marker", "corrupt", "truncated", lambda: zst(mm, body))
    raw("cut_in_a_member", "corrupt", "truncated", lambda: zst(mm, body[:700]))
    raw("bad_header_checksum", "corrupt", "wrong checksum",
        lambda: zst(mm, tar_header("inductor/zz/kernel.py", 12, bad_checksum=True) + pad(b"print('hi')\n"), END))
    raw("non_utf8_name", "corrupt", "not UTF-8",
        lambda: zst(mm, tar_header("inductor/zz/\udcff.py", 0), END))
    raw("trailing_garbage", "corrupt", "after the end of the archive",
        lambda: zst(mm, body, END, b"evil" * 100))
    raw("fifo", "corrupt", "a FIFO", lambda: zst(mm, tar_header("inductor/zz/fifo", 0, b"6"), body, END))
    raw("char_device", "corrupt", "a character device",
        lambda: zst(mm, tar_header("inductor/zz/dev", 0, b"3"), body, END))
    raw("block_device", "corrupt", "a block device",
        lambda: zst(mm, tar_header("inductor/zz/dev", 0, b"4"), body, END))
    raw("symlink_via_pax_path", "corrupt", "unsafe archive member 'inductor/zz/link' -> /etc/passwd",
        lambda: zst(mm, member("pax", pax_records({"path": "inductor/zz/link"}), b"x"),
                    tar_header("x", 0, b"2", linkname="/etc/passwd"), body, END))
    raw("dotdot_via_longname", "corrupt", "'..' or '.' in the path",
        lambda: zst(mm, member("././@LongLink", b"inductor/../../evil.txt\0", b"L"),
                    tar_header("x", 5) + pad(b"owned"), body, END))
    # two names for one member: a reader that lets the later one win installs the real file, another tool
    # checks the traversal (or the reverse); refused whichever way round
    ext = {"x": member("pax", pax_records({"path": "inductor/../../evil.txt"}), b"x"),
           "L": member("././@LongLink", f"inductor/zz/{'k' * 100}.py".encode() + b"\0", b"L")}
    for order, first, second in (("pax_then_longname", "x", "L"), ("longname_then_pax", "L", "x")):
        raw(f"name_twice_{order}", "corrupt", "path is given twice by extended headers",
            lambda first=first, second=second: zst(mm, ext[first], ext[second],
                                                   tar_header("x", 5) + pad(b"owned"), body, END))
    raw("ustar_prefix_escape", "corrupt", "unsafe archive member '../evil.txt'",
        lambda: zst(mm, tar_header("evil.txt", 5, prefix="..") + pad(b"owned"), body, END))
    raw("volume_label", "corrupt", "a volume label", lambda: zst(mm, tar_header("inductor/zz/v", 0, b"V"), END))
    raw("duplicate_member", "corrupt", "appears twice",
        lambda: zst(mm, body, member("inductor/zz/kernel.py", b"print('hi')\n"), END))
    raw("folder_with_data", "corrupt", "appears twice or carries data",
        lambda: zst(mm, member("inductor/zz/", b"data", b"5"), body, END))
    raw("stray_folder", "corrupt", "(a folder) is not in the manifest",
        lambda: zst(mm, tar_header("inductor/elsewhere/", 0, b"5"), body, END))
    raw("checksum_mismatch", "corrupt", "checksum mismatch for 'inductor/zz/kernel.py'",
        lambda: zst(mm, member(f"entries/{FP}/entry.json", files[f"entries/{FP}/entry.json"]),
                    member("inductor/zz/kernel.py", b"print('HI')\n"), END))
    # 5. hostile names (issue 20): each a corrupt archive, exit 4, one line; in the manifest or in the tar stream
    def named(name, data=b"x"):  # the manifest lists ``name`` and the stream carries it (a PAX path)
        return lambda: zst(manifest_member(manifest_for({**files, name: data})), body,
                           member("pax", pax_records({"path": name}), b"x"), tar_header("x", len(data)) + pad(data),
                           END)

    def in_stream_only(name):  # a valid manifest; the stream has an extra member named ``name``
        return lambda: zst(mm, member("pax", pax_records({"path": name}), b"x"), tar_header("x", 1) + pad(b"x"),
                           body, END)

    deep = "inductor/" + "a/" * 2000 + "x.py"  # 4,000 characters: RecursionError in mkdir(parents=True)
    raw("name_nested_4000_characters", "corrupt", "a name over 1024 bytes", named(deep))
    raw("name_nested_17_folders", "corrupt", "over 16 folders deep", named("inductor/" + "a/" * 17 + "x.py"))
    raw("name_nested_in_stream", "corrupt", "over 16 folders deep", in_stream_only("inductor/" + "a/" * 40 + "x"))
    raw("name_lone_surrogate_in_manifest", "corrupt", "lone surrogate",
        lambda: zst(manifest_member(json.dumps(manifest_for({**files, "inductor/zz/\ud800.py": b"x"})).encode()),
                    body, END))
    raw("name_lone_surrogate_in_a_value", "corrupt", "lone surrogate",
        lambda: zst(manifest_member(json.dumps({**m, "note": "\udfff"}).encode()), body, END))
    wide = "inductor/" + "/".join(["\u4e2d" * 80] * 16) + ".py"  # 16 parts of 240 bytes: under 255 each
    raw("name_long_and_wide", "corrupt", "a name over 1024 bytes", named(wide))
    raw("name_long_and_wide_in_stream", "corrupt", "a name over 1024 bytes", in_stream_only(wide))
    raw("name_part_over_255_bytes", "corrupt", "a path component over 255 bytes",
        named("inductor/" + "\u00e9" * 130 + ".py"))
    for label, char in (("c1_next_line", "\x85"), ("c1_csi", "\x9b"), ("del", "\x7f"), ("newline", "\n"),
                        ("line_separator", "\u2028"), ("bidi_override", "\u202e")):
        raw(f"name_{label}", "corrupt", "a control character, line separator or lone surrogate",
            named(f"inductor/zz/evil{char}.py"))
        raw(f"name_{label}_in_stream", "corrupt", "a control character, line separator or lone surrogate",
            in_stream_only(f"inductor/zz/evil{char}.py"))
    raw("environment_value_with_a_newline", "corrupt", "no valid environment",
        lambda: zst(manifest_member({**m, "environment": {**m["environment"], "torch": "9.9\nall good"}}), body,
                    END))
    # 6. the manifest's memory bound (issue 20): names checked before any is expanded into its folders
    one_char = ["inductor/" + "/".join("abcdefghij"[(i + k) % 10] for k in range(2040)) + f"{i}" for i in range(1000)]
    raw("manifest_1000_names_of_4090_characters", "corrupt", "a name over 1024 bytes",
        lambda: zst(manifest_member(manifest_for({**files, **{n: b"" for n in one_char}})), body, END))
    expand = {f"inductor/{i:05d}/" + "/".join([f"{k:x}" * 60 for k in range(14)]) + "/f": b"" for i in range(2600)}
    raw("manifest_folders_over_the_bound", "corrupt", "folders add up to over",
        lambda: zst(manifest_member(manifest_for({**files, **expand})), body, END))
    # 7. zstd frames that are not data (issue 20): refused wherever they are; the allowance is the real payload
    raw("zstd_skippable_frame_before", "corrupt", "a zstd skippable frame at byte 0",
        lambda: skippable(100) + zst(mm, body, END))
    raw("zstd_skippable_frame_between", "corrupt", "a zstd skippable frame at byte",
        lambda: zst(mm) + skippable(10) + zst(body, END))
    raw("zstd_skippable_frame_after", "corrupt", "a zstd skippable frame at byte",
        lambda: zst(mm, body, END) + skippable(0))
    raw("zstd_skippable_padding_2MiB", "corrupt", "a zstd skippable frame at byte",
        lambda: zeros_bomb(skippable(2 * 2**20)))
    raw("zstd_empty_block_padding_2MiB", "corrupt", "over 1000x its compressed payload",
        lambda: zeros_bomb(empty_blocks(700_000)))
    raw("zstd_data_after_the_frames", "corrupt", "data after the end of the compressed stream",
        lambda: zst(mm, body, END) + b"\0" * 64)
    return C


def skippable(n: int, magic: int = 0x184D2A53) -> bytes:
    return struct.pack("<II", magic, n) + b"\0" * n


def empty_blocks(n: int) -> bytes:
    """One zstd frame of ``n`` empty raw blocks: valid, decompresses to nothing, ~3 bytes per block."""
    return struct.pack("<I", 0xFD2FB528) + b"\x00\x00" + b"\x00\x00\x00" * n + b"\x01\x00\x00"


def zeros_bomb(padding: bytes, size: int = 128 * 2**20) -> bytes:
    """A consistent archive with a ``size``-byte file of zeros (a few KB compressed) after ``padding``: the
    padding would raise the allowance (1000 x archive bytes) over ``size`` if it counted."""
    files = good_files()
    m = manifest_for(files)
    zero, h = bytes(2**20), hashlib.sha256()
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(buf, closefd=False) as w:
        for _ in range(size >> 20):
            h.update(zero)
            w.write(zero)
    m["files"]["inductor/zz/big.bin"] = {"size": size, "sha256": h.hexdigest()}
    m["total_bytes"] += size
    head = zst(manifest_member(m), *(member(k, v) for k, v in files.items()), tar_header("inductor/zz/big.bin", size))
    return head + padding + buf.getvalue() + zst(END)


CORPUS = _corpus()

DRIVER = r"""
import contextlib, io, json, logging, sys
def peak_mb():  # VmHWM: this program's own peak RSS (ru_maxrss would carry the spawning process's peak)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
class _Stderr(logging.Handler):  # logging follows redirect_stderr
    def emit(self, record):
        sys.stderr.write(self.format(record) + "\n")
logging.getLogger().addHandler(_Stderr())
logging.getLogger().setLevel(logging.INFO)
from sd3plugin.cli.cache import main
out = []
for argv in json.loads(sys.stdin.read()):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = "raised " + repr(exc)
    out.append({"argv": argv, "code": code, "stdout": o.getvalue(), "stderr": e.getvalue(),
                "maxrss_mb": peak_mb()})
print("RESULT=" + json.dumps(out))
"""


def run_driver(runs: list[list[str]], env: dict | None = None) -> tuple[list[dict], float]:
    """Run sd3plugin-cache commands one after the other in one fresh process; (results, its peak RSS MB)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    out, err = proc.communicate(json.dumps(runs), timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT="))[len("RESULT="):])
    return results, max(r["maxrss_mb"] for r in results)


def tree(path: Path) -> dict:
    """Every file (sha256), folder and link under ``path``, byte for byte (the lock file included)."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{oct(p.stat().st_mode & 0o777)}"
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def existing(tmp_path, capsys):
    """A cache dir with an installed archive and a locally warmed entry."""
    src = make_cache(tmp_path / "src")
    archive = tmp_path / "a.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(archive), capsys=capsys)[0] == 0
    target = tmp_path / "serve" / "cache"
    assert cli("install", str(archive), "--cache-dir", str(target), capsys=capsys)[0] == 0
    (target / "entries" / "ffffeeeeddddcccc").mkdir()
    store.write_json(target / "entries" / "ffffeeeeddddcccc" / "entry.json",
                     {"fingerprint": "ffffeeeeddddcccc", "environment": environment(), "config": {}, "shapes": []})
    (target / "models").mkdir(exist_ok=True)
    (target / "models" / "m.bin").write_bytes(b"m")
    return target


# -- the corpus ------------------------------------------------------------------------------------------
def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


def test_hostile_corpus_is_refused_with_bounded_memory(tmp_path, existing):
    """Every archive of the corpus: its exit code, a one-line message naming the problem, the cache tree
    unchanged byte for byte, nothing written beside it, and the peak RSS of the process under 400 MB."""
    arch_dir = tmp_path / "archives"
    arch_dir.mkdir()
    runs, cases = [], []
    for name, (build, code, message) in sorted(CORPUS.items()):
        path = arch_dir / f"{name}.tar.zst"
        build(path)
        work = tmp_path / "work" / name
        shutil.copytree(existing.parent, work, symlinks=True)
        cases.append((name, code, message, work))
        runs.append(["install", str(path), "--cache-dir", str(work / "cache"), "--json"])
    # info reads only the manifest, with the same limits: what follows it does not matter
    info = {"longname_first_1GiB": "corrupt", "pax_global_1GiB": "corrupt", "manifest_nested_200k": "corrupt",
            "manifest_over_limit": "corrupt", "manifest_too_many_containers": "corrupt", "gnu_longname_1GiB": "ok",
            "zstd_bomb_consistent_manifest": "ok", "name_lone_surrogate_in_manifest": "corrupt",
            "name_nested_4000_characters": "corrupt", "name_long_and_wide": "corrupt", "name_c1_next_line": "corrupt",
            "manifest_1000_names_of_4090_characters": "corrupt", "manifest_folders_over_the_bound": "corrupt",
            "environment_value_with_a_newline": "corrupt", "zstd_skippable_frame_before": "corrupt"}
    for name in info:
        runs.append(["info", str(arch_dir / f"{name}.tar.zst"), "--json"])
    before = {name: tree(work) for name, _, _, work in cases}
    archives_before = tree(arch_dir)
    results, peak = run_driver(runs)
    wrong = [(name, r["code"], r["stdout"][:400] + r["stderr"][-400:]) for (name, code, message, _), r
             in zip(cases, results) if r["code"] != EXIT[code] or message not in r["stdout"]]
    assert not wrong, "\n".join(map(str, wrong))
    for (name, code, message, work), r in zip(cases, results):
        assert r["stderr"].strip().count("\n") == 0 and "Traceback" not in r["stderr"], (name, r["stderr"])
        assert tree(work) == before[name], name  # cache and its parent folder, byte for byte
    for name, r in zip(info, results[len(cases):]):
        assert r["code"] == EXIT[info[name]] and "Traceback" not in r["stderr"], (name, r)
    assert tree(arch_dir) == archives_before  # nothing written beside the archives
    assert not list(Path("/tmp").glob("*evil*"))
    assert peak < RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB"


def test_a_valid_archive_installs_with_bounded_memory(tmp_path):
    """The other side of the corpus: a valid archive with a large file installs, memory stays bounded."""
    files = {**good_files(), "inductor/zz/big.bin": os.urandom(48 * 2**20)}
    path = tmp_path / "big.tar.zst"
    path.write_bytes(plain_archive(files))
    results, peak = run_driver([["install", str(path), "--cache-dir", str(tmp_path / "c"), "--json"],
                                ["info", str(path), "--json"]])
    assert [r["code"] for r in results] == [0, 0], results
    assert (tmp_path / "c" / "inductor" / "zz" / "big.bin").read_bytes() == files["inductor/zz/big.bin"]
    assert peak < RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB"


def test_archives_of_several_data_frames_install(tmp_path, capsys):
    """Data frames, however many, are the archive; only frames that are not data are refused."""
    files = good_files()
    body = [member(k, v) for k, v in files.items()]
    path = tmp_path / "frames.tar.zst"
    path.write_bytes(zst(manifest_member(manifest_for(files))) + b"".join(zst(b) for b in body) + empty_blocks(3)
                     + zst(END))
    code, data, text = cli("install", str(path), "--cache-dir", str(tmp_path / "c"), "--json", capsys=capsys)
    assert code == 0, text
    assert (tmp_path / "c" / "inductor" / "zz" / "kernel.py").read_bytes() == files["inductor/zz/kernel.py"]


# -- the bytes hashed are the bytes installed -----------------------------------------------------------------
def _big_cache_archive(tmp_path, name, content: bytes, capsys) -> tuple[Path, str]:
    src = make_cache(tmp_path / f"src-{name}")
    (src / "inductor" / "ab" / "payload.bin").write_bytes(content)
    path = tmp_path / f"{name}.tar.zst"
    code, data, text = cli("pack", "--cache-dir", str(src), "-o", str(path), "--level", "1", "--json",
                           capsys=capsys)
    assert code == 0, text
    return path, data["archive_sha256"]


def test_expect_sha256_installs_the_bytes_it_hashed(tmp_path, capsys, monkeypatch):
    """The archive is swapped at its path while it is hashed: the pinned bytes are installed, or nothing."""
    good, good_sha = _big_cache_archive(tmp_path, "good", os.urandom(3 * 2**20), capsys)
    evil, _ = _big_cache_archive(tmp_path, "evil", b"evil" * 2**18, capsys)
    path = tmp_path / "cache.tar.zst"
    shutil.copy(good, path)
    real_read, swapped = tar_reader.Source.read, []

    def read(self, n=-1):
        if not swapped and self.count:  # once, in the middle of the first pass
            os.replace(evil, path)
            swapped.append(True)
        return real_read(self, n)

    monkeypatch.setattr(tar_reader.Source, "read", read)
    target = tmp_path / "t"
    code, data, text = cli("install", str(path), "--cache-dir", str(target), "--expect-sha256", good_sha, "--json",
                           capsys=capsys)
    assert swapped and code == 0, text
    assert (target / "inductor" / "ab" / "payload.bin").read_bytes() != b"evil" * 2**18
    assert json.loads((target / store.INSTALLED).read_text())["archive_sha256"] == good_sha


def test_archive_changed_in_place_while_installing_is_refused(tmp_path, capsys, monkeypatch):
    good, good_sha = _big_cache_archive(tmp_path, "good", os.urandom(3 * 2**20), capsys)
    real_scan, calls = archive_scan.scan_source, []

    def scan(source, path, extract_to=None, manifest_only=False):
        calls.append(extract_to)
        if extract_to is not None:  # between pass 1 and pass 2: rewrite a byte of the same file
            with open(good, "r+b") as f:
                f.seek(good.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
        return real_scan(source, path, extract_to, manifest_only)

    monkeypatch.setattr(archive_scan, "scan_source", scan)
    target = tmp_path / "t"
    code, data, text = cli("install", str(good), "--cache-dir", str(target), "--json", capsys=capsys)
    assert code == EXIT["corrupt"], text
    assert not (target / "entries").exists() and not list(target.glob(".install-*"))


# -- atomic commit: a failure at any rename, SIGKILL at any point -----------------------------------------
@pytest.fixture
def two_archives(tmp_path, capsys):
    """(old cache dir, archive B, uninterrupted result of installing B over the old dir)."""
    a = make_cache(tmp_path / "a")
    for i in range(40):
        (a / "inductor" / f"k{i:02d}").mkdir()
        (a / "inductor" / f"k{i:02d}" / "kernel.py").write_text(f"# kernel {i}\n")
    b = make_cache(tmp_path / "b")
    (b / "entries" / FP / "aaaa.megacache").write_bytes(b"blob of archive b " * 100)
    (b / "entries" / FP / "bbbb.megacache").write_bytes(b"second blob of b " * 100)
    meta = json.loads((b / "entries" / FP / "entry.json").read_text())
    meta["blobs"]["bbbb.megacache"] = {"shapes": [], "size_bytes": 1700}
    store.write_json(b / "entries" / FP / "entry.json", meta)
    for i in range(20, 70):
        (b / "inductor" / f"k{i:02d}").mkdir()
        (b / "inductor" / f"k{i:02d}" / "kernel.py").write_text(f"# kernel {i}\n")
    pa, pb = tmp_path / "a.tar.zst", tmp_path / "b.tar.zst"
    for src, p in ((a, pa), (b, pb)):
        assert cli("pack", "--cache-dir", str(src), "-o", str(p), capsys=capsys)[0] == 0
    old = tmp_path / "old" / "cache"
    assert cli("install", str(pa), "--cache-dir", str(old), capsys=capsys)[0] == 0
    (old / "entries" / "ffffeeeeddddcccc").mkdir()
    store.write_json(old / "entries" / "ffffeeeeddddcccc" / "entry.json", {"fingerprint": "ffffeeeeddddcccc"})
    new = tmp_path / "new" / "cache"
    shutil.copytree(old, new, symlinks=True)
    assert cli("install", str(pb), "--cache-dir", str(new), capsys=capsys)[0] == 0
    return old, pb, new


def content(root: Path) -> dict:
    """The cache's content, without what differs from one install to the next (times, inodes)."""
    return {k: v for k, v in tree(root).items() if k not in (".lock", store.INSTALLED, store.CHECKSUMS)}


def test_a_failure_at_any_rename_leaves_the_cache_exactly_as_it_was(tmp_path, two_archives, capsys, monkeypatch):
    old, pb, new = two_archives
    pristine = tmp_path / "pristine"
    shutil.copytree(old, pristine, symlinks=True)
    want = tree(old)
    real_rename, count = os.rename, [0]

    def counting(src, dst):
        count[0] += 1
        return real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", counting)
    shutil.rmtree(old)
    shutil.copytree(pristine, old, symlinks=True)
    want = tree(old)
    assert cli("install", str(pb), "--cache-dir", str(old), capsys=capsys)[0] == 0
    total = count[0]
    assert total > 30  # every new file of the commit moves by rename (identical ones stay)
    for k in list(range(1, total + 1, 3)) + [total]:
        shutil.rmtree(old)
        shutil.copytree(pristine, old, symlinks=True)
        maintain(old)  # a copy is hashed once and its new identities recorded (checksums.json)
        want = tree(old)
        calls = [0]

        def failing(src, dst, k=k):
            calls[0] += 1
            if calls[0] == k:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_rename(src, dst)

        monkeypatch.setattr(store.os, "rename", failing)
        code, data, text = cli("install", str(pb), "--cache-dir", str(old), "--json", capsys=capsys)
        monkeypatch.setattr(store.os, "rename", real_rename)
        assert code == EXIT["cannot_write"], (k, text)
        assert "No space left on device" in data["error"] and "the cache is as it was" in data["error"]
        assert tree(old) == want, k


def test_a_failed_install_into_a_new_dir_leaves_no_dir(tmp_path, two_archives, capsys, monkeypatch):
    _, pb, _ = two_archives
    real_rename = os.rename

    def failing(src, dst):
        if "/.install-" in str(src) and "/new/" in str(src):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", failing)
    target = tmp_path / "fresh" / "cache"
    code, data, _ = cli("install", str(pb), "--cache-dir", str(target), "--json", capsys=capsys)
    assert code == EXIT["cannot_write"] and "Input/output error" in data["error"]
    assert not target.exists()


KILLER = r"""
import json, os, random, signal, sys, time
from sd3plugin.cli.cache import main
import sd3plugin.cache.store as store
args = json.loads(sys.argv[1])
for line in sys.stdin:
    cmd = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if cmd.get("die_at_rename"):
            real, n = os.rename, [0]
            def rename(a, b):
                n[0] += 1
                if n[0] == cmd["die_at_rename"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(a, b)
            store.os.rename = rename
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1); os.dup2(fd, 2)
        os.write(w, b"s")  # the real event: the child starts the install now
        os._exit(main(args))
    os.close(w)
    os.read(r, 1)
    t0 = time.perf_counter()
    if cmd.get("delay") is not None:
        time.sleep(cmd["delay"])  # a random kill point, not synchronisation
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(r)
    killed = os.WIFSIGNALED(status)
    print(json.dumps({"killed": killed, "code": None if killed else os.WEXITSTATUS(status),
                      "seconds": time.perf_counter() - t0}), flush=True)
"""


def _kill_loop(tmp_path, two_archives, plan: list[dict]):
    old, pb, new = two_archives
    pristine = tmp_path / "pristine"
    shutil.copytree(old, pristine, symlinks=True)
    want_old, want_new = content(old), content(new)
    assert want_old != want_new
    proc = subprocess.Popen([sys.executable, "-c", KILLER,
                             json.dumps(["install", str(pb), "--cache-dir", str(old)])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    outcomes = []
    try:
        def ask(cmd):
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        full = ask({})  # one uninterrupted install gives the time scale of the kill points
        assert full["code"] == 0 and content(old) == want_new
        for cmd in plan:
            shutil.rmtree(old)
            shutil.copytree(pristine, old, symlinks=True)
            if cmd.get("delay") == "random":
                cmd = {"delay": random.uniform(0, full["seconds"] * 1.1)}
            r = ask(cmd)
            raw = content(old)
            if r["killed"]:
                assert raw in (want_old, want_new) or list(old.glob(".install-*")), "partial, no journal to recover"
                if raw not in (want_old, want_new):
                    outcomes.append("recovered")
            # the next command recovers (ls is read-only; a server's activate() or any locked command recovers)
            activate(old)
            got = content(old)
            assert got in (want_old, want_new), (cmd, r)
            assert not list(old.glob(".install-*"))
            installed = json.loads((old / store.INSTALLED).read_text())["archive"]
            assert installed.endswith("b.tar.zst") == (got == want_new)
            assert store.check_files(old, full=True) == []
            outcomes.append("new" if got == want_new else "old")
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return outcomes


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_sigkill_at_every_rename_of_the_commit_is_recovered(tmp_path, two_archives):
    renames = 2 * 52 + 4  # upper bound of the commit's renames (backups + moves); beyond it: completed
    outcomes = _kill_loop(tmp_path, two_archives, [{"die_at_rename": k} for k in range(1, renames, 7)])
    assert "old" in outcomes and "recovered" in outcomes  # killed mid-commit: rolled back by the next command


@pytest.mark.slow  # long: in the slow lane of .ci/run
def test_sigkill_at_random_points_of_install(tmp_path, two_archives):
    random.seed(13)
    outcomes = _kill_loop(tmp_path, two_archives, [{"delay": "random"} for _ in range(12)])
    assert len([o for o in outcomes if o != "recovered"]) == 12


@pytest.mark.slow
def test_sigkill_at_random_points_of_install_many(tmp_path, two_archives):
    random.seed(1313)
    outcomes = _kill_loop(tmp_path, two_archives, [{"delay": "random"} for _ in range(150)])
    print({o: outcomes.count(o) for o in set(outcomes)})
    assert {"old", "new"} <= set(outcomes)


# -- clashes between the archive and the cache ---------------------------------------------------------------------
def test_archive_file_where_the_cache_has_a_folder(tmp_path, existing, capsys):
    (existing / "inductor" / "zz").mkdir(parents=True)
    (existing / "inductor" / "zz" / "kernel.py" / "x").parent.mkdir()
    (existing / "inductor" / "zz" / "kernel.py" / "x").write_text("a folder here")
    path = tmp_path / "clash.tar.zst"
    path.write_bytes(plain_archive())
    before = tree(existing.parent)
    code, data, text = cli("install", str(path), "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == EXIT["cannot_write"], text
    assert "the cache dir has a folder there, the archive a file" in data["error"]
    assert tree(existing.parent) == before


# -- disk full ---------------------------------------------------------------------------------------------------
TMPFS_SCRIPT = r"""
import json, os, subprocess, sys
mnt, small_archive, big_archive, src = sys.argv[1:5]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k,nr_inodes=4000", "tmpfs", mnt], check=True)
from sd3plugin.cli.cache import main
import contextlib, io, hashlib
from pathlib import Path
def tree(p):
    return {str(q.relative_to(p)): hashlib.sha256(q.read_bytes()).hexdigest() if q.is_file() else "dir"
            for q in sorted(Path(p).rglob("*"))}
def run(*argv):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            code = main(list(argv))
        except BaseException as exc:
            code = "raised " + repr(exc)
    return {"code": code, "stderr": e.getvalue()}
cache = os.path.join(mnt, "cache")
out = {"first": run("install", small_archive, "--cache-dir", cache)}
before = tree(mnt)
out["full"] = run("install", big_archive, "--cache-dir", cache)
out["unchanged"] = tree(mnt) == before
out["pack"] = run("pack", "--cache-dir", src, "-o", os.path.join(mnt, "out.tar.zst"), "--level", "1")
out["pack_unchanged"] = tree(mnt) == before
print("RESULT=" + json.dumps(out))
"""


def test_disk_full_on_a_small_tmpfs(tmp_path, capsys):
    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("no unshare/mount here")
    probe = subprocess.run(["unshare", "-rm", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.decode()[:200]}")
    small = make_cache(tmp_path / "small")
    big = make_cache(tmp_path / "big")
    for i in range(150):  # 150 small files: 600 KiB on tmpfs (4 KiB pages), 60 KiB of content
        (big / "inductor" / f"d{i:03d}").mkdir()
        (big / "inductor" / f"d{i:03d}" / "k.py").write_text(f"# {i}\n" * 60)
    incompressible = make_cache(tmp_path / "incompressible")
    (incompressible / "inductor" / "ab" / "blob.bin").write_bytes(os.urandom(2 * 2**20))
    pa, pb = tmp_path / "small.tar.zst", tmp_path / "big.tar.zst"
    for src, p in ((small, pa), (big, pb)):
        assert cli("pack", "--cache-dir", str(src), "-o", str(p), capsys=capsys)[0] == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-rm", "--propagation", "private", sys.executable, "-c", TMPFS_SCRIPT,
                           str(mnt), str(pa), str(pb), str(incompressible)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT="))[7:])
    assert out["first"]["code"] == 0, out
    assert out["full"]["code"] == EXIT["cannot_write"], out
    assert "No space left on device" in out["full"]["stderr"] and out["full"]["stderr"].count("\n") == 1
    assert out["unchanged"], "the cache changed after a disk-full install"
    assert out["pack"]["code"] == EXIT["cannot_write"], out
    assert "No space left on device" in out["pack"]["stderr"] and out["pack"]["stderr"].count("\n") == 1
    assert out["pack_unchanged"], "pack left a partial archive"


def test_disk_full_while_packing_is_one_line(tmp_path, capsys, monkeypatch):
    src = make_cache(tmp_path / "c")
    out = tmp_path / "out"

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pack_mod._HashingWriter, "write", full)
    code, data, text = cli("pack", "--cache-dir", str(src), "-o", str(out / "a.tar.zst"), "--json", capsys=capsys)
    assert code == EXIT["cannot_write"] and "No space left on device" in data["error"], text
    assert "Traceback" not in text and list(out.iterdir()) == []


def test_not_enough_space_is_refused_before_writing(tmp_path, existing, capsys, monkeypatch):
    path = tmp_path / "a.tar.zst"
    path.write_bytes(plain_archive())
    before = tree(existing.parent)
    monkeypatch.setattr(install_mod.os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255)))
    code, data, _ = cli("install", str(path), "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == EXIT["cannot_write"] and "0 are free" in data["error"]
    assert tree(existing.parent) == before


# -- warm and install ---------------------------------------------------------------------------------------------
WARM_CHILD = r"""
import json, sys
from sd3plugin.apps import warm as warmup
from sd3plugin.config import compose
root = sys.argv[1]
def fake_compile(cfg, shapes, steps, progress):
    print("compiling", flush=True)
    sys.stdin.readline()  # until the test says so
    per_shape = [dict(s, seconds=0.1, fresh_compilations=1, fxgraph_cache_hit=0) for s in shapes]
    return (per_shape, {"backend": "inductor", "mode": {"spec": "x"}}, (b"blob warmed here " * 64, {"inductor": 1}),
            {"reason": "test: no precompiled blocks"})
warmup._compile_shapes = fake_compile
cfg = compose(None, ["model=tiny", "device=cpu", f"cache_dir={root}"])
r = warmup.warm(cfg, [{"width": 32, "height": 32, "batch_size": 1, "guidance": True}], steps=1,
                lock_timeout=120, progress=False)
print("RESULT=" + json.dumps(r), flush=True)
"""


@pytest.fixture
def tiny_archive(tmp_path, capsys):
    """An archive whose entry has the fingerprint of model=tiny device=cpu (the one warm writes)."""
    from sd3plugin.cache.manifest import fingerprint
    from sd3plugin.config import compose

    fp = fingerprint(compose(None, ["model=tiny", "device=cpu"]))
    src = make_cache(tmp_path / "src")
    os.rename(src / "entries" / FP, src / "entries" / fp)
    meta = json.loads((src / "entries" / fp / "entry.json").read_text())
    store.write_json(src / "entries" / fp / "entry.json", {**meta, "fingerprint": fp})
    path = tmp_path / "tiny.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(path), capsys=capsys)[0] == 0
    return path, fp


def _start_warm(root: Path):
    proc = subprocess.Popen([sys.executable, "-c", WARM_CHILD, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "compiling", proc.stderr.read()[-3000:]
    return proc


def _finish_warm(proc) -> dict:
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT="))[7:])


def _assert_both(root: Path, fp: str, warm_blob: str):
    meta = json.loads((root / "entries" / fp / "entry.json").read_text())
    assert set(meta["blobs"]) == {"aaaa.megacache", warm_blob}
    assert (root / "entries" / fp / warm_blob).read_bytes() == b"blob warmed here " * 64
    assert (root / "entries" / fp / "aaaa.megacache").is_file()
    assert {(s["width"], s["height"]) for s in meta["shapes"]} == {(64, 64), (32, 32)}
    assert store.check_files(root, full=True) == []


def test_warm_during_the_checks_of_an_install_is_not_lost(tmp_path, tiny_archive, capsys, monkeypatch):
    """The race of issue 13: install checks the archive, a warm stores its blob meanwhile, install commits."""
    path, fp = tiny_archive
    root = tmp_path / "cache"
    real_check, warmed = install_mod.check_compatibility, {}

    def check_then_warm(manifest, force=False):
        warmed.update(_finish_warm(_start_warm(root)))  # a whole warm between pass 1 and the lock
        return real_check(manifest, force)

    monkeypatch.setattr(install_mod, "check_compatibility", check_then_warm)
    code, data, text = cli("install", str(path), "--cache-dir", str(root), "--json", capsys=capsys)
    assert code == 0, text
    assert data["replaced_entries"] == [fp] and data["kept_blobs"] == [f"{fp}/{warmed['blob']}"]
    _assert_both(root, fp, warmed["blob"])


def test_install_waits_for_a_warm_and_keeps_its_work(tmp_path, tiny_archive, capsys, monkeypatch):
    path, fp = tiny_archive
    root = tmp_path / "cache"
    warm = _start_warm(root)  # holds the lock, "compiling"
    waiting = threading.Event()
    real_lock = install_mod.cache_lock

    def lock(*a, **k):
        waiting.set()
        return real_lock(*a, **k)

    monkeypatch.setattr(install_mod, "cache_lock", lock)
    result = {}
    t = threading.Thread(target=lambda: result.update(code=cli("install", str(path), "--cache-dir", str(root),
                                                               "--lock-timeout", "120")[0]))
    t.start()
    assert waiting.wait(60)
    assert t.is_alive()  # blocked on the warm's lock
    warmed = _finish_warm(warm)
    t.join(120)
    assert result["code"] == 0
    _assert_both(root, fp, warmed["blob"])


@pytest.mark.parametrize("archive_has_blocks", [True, False])
def test_install_keeps_the_precompiled_blocks_a_concurrent_warm_built(tmp_path, capsys, monkeypatch,
                                                                       archive_has_blocks):
    """Issue 20, item 7: a warm stores a precompiled block (another input key) between install's checks and its
    commit; after the install the entry has the archive's blocks and the warm's, each usable."""
    from sd3plugin.cache import precompiled
    from sd3plugin.cache.lock import cache_lock

    env = environment()
    src = make_cache(tmp_path / "src")
    archive_block = (({"kind": "transformer_block", "key": "k-archive", "structure": "s"}, b"archive block " * 50))
    if archive_has_blocks:
        precompiled.write(src, FP, [archive_block], [], env)
    path = tmp_path / "a.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(path), capsys=capsys)[0] == 0
    root = tmp_path / "cache"
    assert cli("install", str(path), "--cache-dir", str(root), capsys=capsys)[0] == 0
    real_check = install_mod.check_compatibility

    def check_then_warm(manifest, force=False):  # what warm's _store_precompiled does, under the lock
        with cache_lock(root, 10, "warm"):
            valid, _, _ = precompiled.usable(root, FP, env)
            precompiled.write(root, FP, [({"kind": "transformer_block", "key": "k-warm", "structure": "s"},
                                          b"warm block " * 70)], [r for r, _ in valid], env)
            store.refresh_checksums(root)  # as warm does after storing its blocks
        return real_check(manifest, force)

    monkeypatch.setattr(install_mod, "check_compatibility", check_then_warm)
    code, data, text = cli("install", str(path), "--cache-dir", str(root), "--json", capsys=capsys)
    assert code == 0, text
    warm_file = f"block-{precompiled.sha256(b'warm block ' * 70)[:12]}{precompiled.SUFFIX}"
    assert data["kept_blobs"] == [f"{FP}/{precompiled.FOLDER}/{warm_file}"]
    ok, bad, why = precompiled.usable(root, FP, env)
    expected = {"k-warm": b"warm block " * 70, **({"k-archive": archive_block[1]} if archive_has_blocks else {})}
    assert {r["key"]: d for r, d in ok} == expected and bad == [], why
    meta = json.loads((root / "entries" / FP / "entry.json").read_text())
    assert meta["precompiled"]["artefacts"] == len(expected)
    assert store.check_files(root, full=True) == []
    # the next install of the same archive keeps them again (nothing is lost by installing twice)
    monkeypatch.setattr(install_mod, "check_compatibility", real_check)
    assert cli("install", str(path), "--cache-dir", str(root), capsys=capsys)[0] == 0
    assert {r["key"] for r, _ in precompiled.usable(root, FP, env)[0]} == set(expected)


def test_install_drops_damaged_local_precompiled_blocks(tmp_path, capsys):
    """A local block whose bytes differ from its index record is not carried into the installed entry."""
    from sd3plugin.cache import precompiled

    env = environment()
    src = make_cache(tmp_path / "src")
    path = tmp_path / "a.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(path), capsys=capsys)[0] == 0
    root = tmp_path / "cache"
    assert cli("install", str(path), "--cache-dir", str(root), capsys=capsys)[0] == 0
    index = precompiled.write(root, FP, [({"key": "k"}, b"local block " * 40)], [], env)
    block = precompiled.folder(root, FP) / index["artefacts"][0]["file"]
    block.write_bytes(b"damaged")
    code, data, text = cli("install", str(path), "--cache-dir", str(root), "--json", capsys=capsys)
    assert code == 0 and data["kept_blobs"] == [], text
    assert not precompiled.folder(root, FP).exists()


# -- signed archives ----------------------------------------------------------------------------------------------
@pytest.fixture
def keys(tmp_path, capsys):
    out = {}
    for name in ("ci", "other"):
        code, data, text = cli("keygen", "-o", str(tmp_path / "keys" / name), "--json", capsys=capsys)
        assert code == 0, text
        out[name] = (Path(data["private_key"]), Path(data["public_key"]), data["key_id"])
    assert oct(out["ci"][0].stat().st_mode & 0o777) == "0o600"
    return out


def test_signed_archive_installs_with_the_trusted_key(tmp_path, keys, capsys, monkeypatch):
    src = make_cache(tmp_path / "src")
    path = tmp_path / "a.tar.zst"
    code, data, text = cli("pack", "--cache-dir", str(src), "-o", str(path), "--sign", str(keys["ci"][0]), "--json",
                           capsys=capsys)
    assert code == 0 and Path(data["signature"]) == Path(str(path) + ".sig"), text
    code, data, text = cli("install", str(path), "--cache-dir", str(tmp_path / "t"), "--trust", str(keys["ci"][1]),
                           "--json", capsys=capsys)
    assert code == 0 and data["signed_by"] == keys["ci"][2], text
    assert json.loads((tmp_path / "t" / store.INSTALLED).read_text())["signed_by"] == data["signed_by"]
    monkeypatch.setenv("SD3PLUGIN_TRUSTED_KEY", str(keys["ci"][1]))  # the setting for servers
    assert cli("install", str(path), "--cache-dir", str(tmp_path / "t2"), capsys=capsys)[0] == 0
    code, data, _ = cli("info", str(path), "--json", capsys=capsys)
    assert data["signature"]["verified"] is True and data["signature"]["key_id"]


def _refused_untrusted(tmp_path, archive, capsys, *extra, message):
    target = tmp_path / "t"
    code, data, text = cli("install", str(archive), "--cache-dir", str(target), "--json", *extra, capsys=capsys)
    assert code == EXIT["untrusted"], text
    assert message in data["error"]
    assert not target.exists()


def test_untrusted_archives_are_refused_before_reading_them(tmp_path, keys, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the archive was parsed before its signature was checked")

    src = make_cache(tmp_path / "src")
    path = tmp_path / "a.tar.zst"
    assert cli("pack", "--cache-dir", str(src), "-o", str(path), "--sign", str(keys["ci"][0]), capsys=capsys)[0] == 0
    monkeypatch.setattr(archive_scan, "scan_source", never)
    trust = ("--trust", str(keys["ci"][1]))
    # wrong key
    _refused_untrusted(tmp_path, path, capsys, "--trust", str(keys["other"][1]), message="does not verify")
    # unsigned (random bytes: it would be exit 4 if it were read)
    junk = tmp_path / "junk.tar.zst"
    junk.write_bytes(os.urandom(4096))
    _refused_untrusted(tmp_path, junk, capsys, *trust, message="not signed")
    monkeypatch.setenv("SD3PLUGIN_TRUSTED_KEY", str(keys["ci"][1]))
    _refused_untrusted(tmp_path, junk, capsys, message="not signed")
    # a valid signature of another archive
    shutil.copy(str(path) + ".sig", str(junk) + ".sig")
    _refused_untrusted(tmp_path, junk, capsys, message="signature is for another archive")
    # a forged signature line
    sig = Path(str(path) + ".sig").read_text().splitlines()
    forged = tmp_path / "forged.tar.zst"
    shutil.copy(path, forged)
    Path(str(forged) + ".sig").write_text("\n".join(sig[:3] + ["signature: " + "A" * 86 + "=="]) + "\n")
    _refused_untrusted(tmp_path, forged, capsys, message="does not verify")
    Path(str(forged) + ".sig").write_bytes(os.urandom(100000))
    _refused_untrusted(tmp_path, forged, capsys, message="not an sd3plugin-cache signature")


def test_bad_keys_are_usage_errors(tmp_path, capsys):
    src = make_cache(tmp_path / "src")
    (tmp_path / "k").write_text("not a key")
    code, data, _ = cli("pack", "--cache-dir", str(src), "-o", str(tmp_path / "a.tar.zst"), "--sign",
                        str(tmp_path / "k"), "--json", capsys=capsys)
    assert code == EXIT["usage"] and "not an unencrypted Ed25519 private key" in data["error"]
    assert not (tmp_path / "a.tar.zst").exists()
    code, data, _ = cli("install", str(tmp_path / "a.tar.zst"), "--trust", str(tmp_path / "nope.pub"),
                        "--cache-dir", str(tmp_path / "t"), "--json", capsys=capsys)
    assert code == EXIT["usage"] and "cannot read the trusted key" in data["error"]


# -- damaged cache files --------------------------------------------------------------------------------------------
def test_damaged_files_are_found_removed_and_reported(tmp_path, existing):
    kernel = existing / "inductor" / "ab" / "kernel.py"
    so = existing / "inductor" / "ab" / "kernel.so"
    with open(kernel, "r+b") as f:  # cut in half, in place
        f.truncate(kernel.stat().st_size // 2)
    data = bytearray(so.read_bytes())
    data[100] ^= 1
    mtime = so.stat().st_mtime_ns
    with open(so, "r+b") as f:  # same size, same mtime, other content: its ctime changed, so it is hashed
        f.write(data)
    os.utime(so, ns=(mtime, mtime))
    blob = existing / "entries" / FP / "aaaa.megacache"
    with open(blob, "r+b") as f:
        f.truncate(10)
    info = activate(existing)  # what a server does when it loads the cache
    repaired = {r["file"]: r for r in info["cache"]["repaired"]}
    assert set(repaired) == {"inductor/ab/kernel.py", "inductor/ab/kernel.so", f"entries/{FP}/aaaa.megacache"}
    assert not kernel.exists() and not so.exists() and not (existing / "entries" / FP).exists()
    assert "compiled again" in repaired["inductor/ab/kernel.py"]["action"]
    assert "warm it again" in repaired[f"entries/{FP}/aaaa.megacache"]["action"]
    from sd3plugin.cache.lock import maintain

    full = maintain(existing, full=True)  # verify's check hashes every file: nothing left to find
    assert full["repaired"] == []
    assert activate(existing)["cache"]["repaired"] == []


def test_verify_reports_damaged_files(tmp_path, capsys, monkeypatch):
    from sd3plugin.apps import verify as verify_mod
    from sd3plugin.cache.manifest import fingerprint
    from sd3plugin.config import compose

    root = tmp_path / "c"
    src = make_cache(tmp_path / "src")
    fp = fingerprint(compose(None, [f"cache_dir={root}"]))
    os.rename(src / "entries" / FP, src / "entries" / fp)
    meta = json.loads((src / "entries" / fp / "entry.json").read_text())
    store.write_json(src / "entries" / fp / "entry.json", {**meta, "fingerprint": fp})
    assert cli("pack", "--cache-dir", str(src), "-o", str(tmp_path / "a.tar.zst"), capsys=capsys)[0] == 0
    assert cli("install", str(tmp_path / "a.tar.zst"), "--cache-dir", str(root), capsys=capsys)[0] == 0
    (root / "inductor" / "ab" / "kernel.py").write_text("def broken(:\n")  # in place
    child = {"time_to_first_image_seconds": 3.0, "import_seconds": 1, "load_seconds": 1, "first_image_seconds": 1,
             "shape": meta["shapes"][0], "status": "compiled", "fresh_compilations": 0, "fxgraph_cache_miss": 0,
             "fxgraph_cache_hit": 1, "autograd_cache_hit": 0, "cache": {"repaired": []}}
    import types

    fake = types.SimpleNamespace(returncode=0, stdout=verify_mod.MARK + json.dumps(child), stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: fake)
    code, data, _ = cli("verify", "--cache-dir", str(root), "--json", capsys=capsys)
    assert code == 0 and [r["file"] for r in data["repaired"]] == ["inductor/ab/kernel.py"]
    code, _, text = cli("verify", "--cache-dir", str(root), capsys=capsys)
    assert "damaged" not in text  # repaired once, then clean
    assert not (root / "inductor" / "ab" / "kernel.py").exists()
    copy = tmp_path / "copy"  # a restored backup: new inodes, mtimes kept; one byte flipped, one file gone
    subprocess.check_call(["cp", "-a", str(root), str(copy)])  # (subprocess.run is the fake child here)
    so = copy / "inductor" / "ab" / "kernel.so"
    data, st = bytearray(so.read_bytes()), so.stat()
    data[7] ^= 1
    so.write_bytes(bytes(data))
    os.utime(so, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(copy / "entries" / fp / "aaaa.megacache")
    (copy / "entries" / fp / "aaaa.megacache").mkdir()  # an entry file replaced by a folder
    code, data, _ = cli("verify", "--cache-dir", str(copy), "--json", capsys=capsys)
    assert code == EXIT["not_found"] and "\n" not in data["error"]
    assert (f"entries/{fp}/aaaa.megacache: replaced by a link or a folder" in data["error"]
            and "inductor/ab/kernel.so: content changed (sha256 mismatch)" in data["error"])
    assert not so.exists()


def test_random_megacache_blobs_give_one_line_each_no_traceback(tmp_path, caplog):
    from sd3plugin.cache.megacache import load_entries

    root = make_cache(tmp_path / "c")
    meta = json.loads((root / "entries" / FP / "entry.json").read_text())
    for i in range(30):
        name = f"r{i:02d}.megacache"
        (root / "entries" / FP / name).write_bytes(os.urandom(2000))
        meta["blobs"][name] = {"shapes": []}
    store.write_json(root / "entries" / FP / "entry.json", meta)
    with caplog.at_level("INFO"):
        result = load_entries(root)
    assert len(result["skipped"]) == 31 and not result["loaded"]
    assert all("torch could not read it" in s["reason"] for s in result["skipped"])
    assert not any(r.exc_info for r in caplog.records)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) <= 4


# -- leftovers ----------------------------------------------------------------------------------------------------
def test_leftovers_are_listed_and_removed(tmp_path, existing, capsys):
    stale = existing / ".install-killed"
    (stale / "new" / "inductor").mkdir(parents=True)
    (stale / "new" / "inductor" / "big").write_bytes(b"x" * 100000)
    (existing / ".installed.json.abc.tmp").write_text("{")
    code, data, text = cli("ls", "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == 0 and data["leftover_bytes"] >= 100000 and len(data["leftovers"]) == 2
    code, _, text = cli("ls", "--cache-dir", str(existing), capsys=capsys)
    assert "leftovers of interrupted commands: 2" in text
    code, data, text = cli("prune", "--cache-dir", str(existing), "--older-than", "1000", "--yes", "--json",
                           capsys=capsys)
    assert code == 0 and len(data["leftovers_removed"]) == 2 and data["removed"] == []
    assert not stale.exists() and not (existing / ".installed.json.abc.tmp").exists()
    stale.mkdir()
    code, data, _ = cli("clear", "--cache-dir", str(existing), "--yes", "--json", capsys=capsys)
    assert code == 0 and ".install-killed" in data["removed"] and not stale.exists()
    assert (existing / "models" / "m.bin").exists()


# -- one-line errors -----------------------------------------------------------------------------------------------
def test_unexpected_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from sd3plugin.cli import cmd_ls

    def boom(root):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(cmd_ls, "summary", boom)
    code, _, text = cli("ls", "--cache-dir", str(tmp_path), capsys=capsys)
    assert code == EXIT["error"] and text.strip().count("\n") == 0 and "RuntimeError: something odd" in text
    assert "Traceback" not in text


def test_messages_with_control_characters_or_surrogates_are_one_line(tmp_path, capsys, monkeypatch):
    from sd3plugin.cache.errors import CorruptArchiveError
    from sd3plugin.cli import cmd_ls

    def boom(root):
        raise CorruptArchiveError("name evil\ud800\nsecond line\x85third\u2028fourth")

    monkeypatch.setattr(cmd_ls, "summary", boom)
    from sd3plugin.cli.cache import main

    for extra in ((), ("--json",)):
        assert main(["ls", "--cache-dir", str(tmp_path), *extra]) == EXIT["corrupt"]
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
        assert "evil\\ud800\\nsecond line\\x85third\\u2028fourth" in err, err
        if extra:
            assert json.loads(out)["error"] == err.strip()


def test_archive_path_that_is_not_a_file(tmp_path, capsys):
    fifo = tmp_path / "fifo.tar.zst"
    os.mkfifo(fifo)  # opening it must not hang
    for argv in (("install", str(fifo), "--cache-dir", str(tmp_path / "c")), ("info", str(fifo))):
        code, _, text = cli(*argv, "--json", capsys=capsys)
        assert code == EXIT["not_found"] and "not a regular file" in text


# -- random-weight models per environment ---------------------------------------------------------------------------
def test_models_saved_by_another_environment_are_not_reused(tmp_path, monkeypatch):
    from sd3plugin import pipeline
    from sd3plugin.config import compose

    built = []

    def fake_save(name, folder, dtype=None, device="cpu", progress=None):
        folder = Path(folder)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        (folder / "sd3plugin_arch.json").write_text(json.dumps({"arch": name}))
        built.append(folder.name)
        return folder

    monkeypatch.setattr(pipeline, "save_random_pipeline", fake_save)
    cfg = compose(None, ["model=tiny", "device=cpu", f"cache_dir={tmp_path}"])
    first = Path(pipeline.model_path(cfg))
    assert first.name == "tiny-float32" and pipeline.model_path(cfg) == str(first) and built == ["tiny-float32"]
    meta = json.loads((first / "sd3plugin_arch.json").read_text())
    (first / "sd3plugin_arch.json").write_text(json.dumps({**meta, "saved_by": "transformers-4.57"}))
    other = Path(pipeline.model_path(cfg))  # what the other environment saved: not loaded here
    assert other != first and other.name.startswith("tiny-float32-transformers-") and len(built) == 2
    assert pipeline.model_path(cfg) == str(other) and len(built) == 2


# -- end to end: a damaged generated file is rebuilt, not a fallback to eager forever (compiles: slow) -------------
@pytest.mark.slow
def test_a_cut_generated_file_is_rebuilt_end_to_end(tmp_path):
    root = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}

    def run(*argv):
        proc = subprocess.run([sys.executable, "-m", "sd3plugin.cli.cache", *argv, "--cache-dir", str(root),
                               "--json", "steps=2"], capture_output=True, text=True, env=env, timeout=900)
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr

    code, data, err = run("warm", "--resolutions", "64x64")
    assert code == 0, err[-3000:]
    recorded = store.read_checksums(root)
    generated = sorted((r for r in recorded if r.startswith("inductor/") and r.endswith(".py")),
                       key=lambda r: recorded[r]["size"])
    assert generated, sorted(recorded)[:20]
    victim = root / generated[-1]  # the largest generated module: the compiled graph's code
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    code, data, err = run("verify")
    assert code in (0, EXIT["compiled"]), err[-3000:]  # compiled again, never the eager fallback (exit 1)
    assert data["status"] == "compiled" and [r["file"] for r in data["repaired"]] == [generated[-1]]
    code, data, err = run("verify")
    assert code in (0, EXIT["compiled"]) and data["repaired"] == [] and data["status"] == "compiled", err[-3000:]
