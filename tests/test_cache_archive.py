"""Cache archives and the cache CLI without compiling: crafted caches and archives.

Every bad archive (tampered, truncated, other torch, unsafe members) must fail with its exit code and a
message naming the problem, write nothing outside the target and leave the existing cache as it was.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import types
from pathlib import Path

import pytest
import zstandard
from filelock import FileLock

from sd3plugin.cache import store
from sd3plugin.transforms.settings import activate
from sd3plugin.cache.archive import FORMAT, MANIFEST
from sd3plugin.cache.manifest import compatibility, environment
from sd3plugin.cli.cache import main
from sd3plugin.cli.exit_codes import EXIT

FP = "0123456789abcdef"


def make_cache(root: Path, torch_version: str | None = None) -> Path:
    """A small cache dir with the layout warm writes (the blob is not a real Mega-Cache)."""
    env = environment()
    if torch_version:
        env["torch"] = torch_version
    blob = b"not a real mega-cache blob " * 100
    (root / "entries" / FP).mkdir(parents=True)
    (root / "entries" / FP / "aaaa.megacache").write_bytes(blob)
    store.write_json(root / "entries" / FP / "entry.json", {
        "fingerprint": FP, "config": {"model": "tiny", "device": "cpu", "mode": {"spec": "x"}},
        "composed_config": {"model": "tiny"}, "environment": env, "created": "2026-01-01T00:00:00Z",
        "shapes": [{"width": 64, "height": 64, "batch_size": 1, "guidance": True}],
        "blobs": {"aaaa.megacache": {"shapes": [], "size_bytes": len(blob)}}})
    (root / "inductor" / "ab").mkdir(parents=True)
    (root / "inductor" / "ab" / "kernel.py").write_text("print('kernel')\n")
    (root / "inductor" / "ab" / "kernel.so").write_bytes(os.urandom(4096))
    (root / "inductor" / "locks").mkdir()
    (root / "inductor" / "locks" / "x.lock").write_text("")
    (root / "models").mkdir()
    (root / "models" / "weights.bin").write_bytes(b"w" * 10)
    return root


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (relative name -> sha256), and every folder."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel == ".lock":
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


def cli(*argv, capsys=None) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr() if capsys else ("", "")
    data = None
    if "--json" in argv and out.strip():
        data = json.loads(out)
    return code, data, out + err


def write_archive(path: Path, manifest: dict, members: list[tuple[tarfile.TarInfo, bytes | None]],
                  manifest_first: bool = True) -> Path:
    """A tar.zst with ``manifest`` and raw members (any type, any name): for crafting bad archives."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(manifest).encode()
        mi = tarfile.TarInfo(MANIFEST)
        mi.size = len(data)
        items = [(mi, data)] + members if manifest_first else members + [(mi, data)]
        for info, content in items:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def archive_contents(path: Path) -> tuple[dict, list[tuple[tarfile.TarInfo, bytes | None]]]:
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    manifest = json.loads(members[0][1])
    return manifest, members[1:]


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.fixture
def packed(tmp_path, capsys):
    """(source cache, archive, its sha256)."""
    src = make_cache(tmp_path / "src")
    archive = tmp_path / "out" / "cache.tar.zst"
    code, data, text = cli("pack", "--cache-dir", str(src), "-o", str(archive), "--json", capsys=capsys)
    assert code == 0, text
    return src, archive, data["archive_sha256"]


@pytest.fixture
def existing(tmp_path, packed, capsys):
    """A target cache dir already holding an installed cache, inside an otherwise empty parent."""
    _, archive, _ = packed
    target = tmp_path / "serve" / "cache"
    code, _, text = cli("install", str(archive), "--cache-dir", str(target), capsys=capsys)
    assert code == 0, text
    (target / "entries" / "ffffeeeeddddcccc").mkdir()
    store.write_json(target / "entries" / "ffffeeeeddddcccc" / "entry.json",
                     {"fingerprint": "ffffeeeeddddcccc", "environment": environment(), "config": {}, "shapes": []})
    return target


def assert_untouched(target: Path, before: dict, parent_before: list):
    assert snapshot(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == parent_before
    assert not list(target.glob(".install-*"))


# -- pack / install round trip -------------------------------------------------------------------------
def test_pack_writes_manifest_with_versions_files_and_checksums(packed):
    src, archive, digest = packed
    manifest, members = archive_contents(archive)
    assert manifest["format"] == FORMAT
    for key in ("sd3plugin", "python", "torch", "triton", "cuda", "cudnn", "diffusers", "gpu", "gpu_capability"):
        assert key in manifest["environment"]
    assert manifest["fingerprint"] == FP and manifest["shapes"][0]["width"] == 64
    assert manifest["config"] == {"model": "tiny"}
    names = {m.name for m, _ in members}
    # models/, inductor's locks and the cache lock are not packed
    assert names == {"entries/0123456789abcdef/aaaa.megacache", "entries/0123456789abcdef/entry.json",
                     "inductor/ab/kernel.py", "inductor/ab/kernel.so"}
    assert set(manifest["files"]) == names
    for m, data in members:
        assert manifest["files"][m.name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest
    assert (archive.parent / "cache.tar.zst.sha256").read_text().split()[0] == digest
    assert oct(archive.stat().st_mode & 0o777) != "0o600"  # not mkstemp's private mode


def test_install_into_empty_dir_reproduces_the_cache(tmp_path, packed, capsys):
    src, archive, digest = packed
    target = tmp_path / "new" / "cache"
    code, data, text = cli("install", str(archive), "--cache-dir", str(target), "--expect-sha256", digest,
                           "--json", capsys=capsys)
    assert code == 0, text
    assert data["entries"] == [FP] and data["files"] == 4
    want = {k: v for k, v in snapshot(src).items() if not k.startswith(("models", "inductor/locks"))}
    got = {k: v for k, v in snapshot(target).items() if k not in (store.INSTALLED, store.CHECKSUMS)}
    assert got == want
    installed = json.loads((target / store.INSTALLED).read_text())
    assert installed["archive_sha256"] == digest and installed["forced"] is False
    assert not list(target.glob(".install-*"))


def test_install_removes_what_a_killed_install_left(tmp_path, packed, existing, capsys):
    _, archive, _ = packed
    (existing / ".install-killed" / "new").mkdir(parents=True)
    assert cli("install", str(archive), "--cache-dir", str(existing), capsys=capsys)[0] == 0
    assert not list(existing.glob(".install-*"))


def test_reinstall_replaces_the_entry_and_keeps_other_caches(existing, packed, capsys):
    _, archive, _ = packed
    code, data, text = cli("install", str(archive), "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == 0, text
    assert data["replaced_entries"] == [FP]
    assert (existing / "entries" / "ffffeeeeddddcccc" / "entry.json").is_file()  # not ours: kept
    assert (existing / "entries" / FP / "entry.json").is_file()


def test_expect_sha256_mismatch_is_refused_before_anything(tmp_path, packed, capsys):
    _, archive, _ = packed
    target = tmp_path / "t"
    code, _, text = cli("install", str(archive), "--cache-dir", str(target), "--expect-sha256", "0" * 64,
                        capsys=capsys)
    assert code == EXIT["corrupt"] and "expected " + "0" * 64 in text
    assert not target.exists()


# -- bad archives ------------------------------------------------------------------------------------
def _tampered(tmp_path, archive):
    manifest, members = archive_contents(archive)
    members = [(m, (d[:-1] + bytes([d[-1] ^ 1])) if m.name.endswith("kernel.so") else d) for m, d in members]
    return write_archive(tmp_path / "tampered.tar.zst", manifest, members), "checksum mismatch for 'inductor/ab/kernel.so'"


def _truncated(tmp_path, archive):
    data = archive.read_bytes()
    path = tmp_path / "truncated.tar.zst"
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _not_an_archive(tmp_path, archive):
    path = tmp_path / "junk.tar.zst"
    path.write_bytes(os.urandom(1000))
    return path, "not a zstd-compressed"


def _missing_member(tmp_path, archive):
    manifest, members = archive_contents(archive)
    return (write_archive(tmp_path / "short.tar.zst", manifest, [x for x in members if "kernel.py" not in x[0].name]),
            "missing")


def _extra_member(tmp_path, archive):
    manifest, members = archive_contents(archive)
    return (write_archive(tmp_path / "extra.tar.zst", manifest, members + [reg("inductor/ab/evil.py", b"x")]),
            "'inductor/ab/evil.py' is not in the manifest")


def _manifest_not_first(tmp_path, archive):
    manifest, members = archive_contents(archive)
    return write_archive(tmp_path / "late.tar.zst", manifest, members, manifest_first=False), "first member"


def _unsafe(name=None, kind="reg", link=""):
    def make(tmp_path, archive):
        manifest, members = archive_contents(archive)
        if kind == "reg":
            extra = reg(name, b"owned")
        else:
            info = tarfile.TarInfo(name)
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = link
            extra = (info, None)
        return write_archive(tmp_path / "unsafe.tar.zst", manifest, [extra] + members), "unsafe archive member"
    return make


def _file_and_folder(tmp_path, archive):
    manifest, members = archive_contents(archive)
    clash = "entries/0123456789abcdef/entry.json/x"
    manifest["files"][clash] = {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    return write_archive(tmp_path / "clash.tar.zst", manifest, members + [reg(clash, b"x")]), "both a file and a folder"


BAD = {
    "tampered": _tampered, "truncated": _truncated, "not_an_archive": _not_an_archive,
    "missing_member": _missing_member, "extra_member": _extra_member, "manifest_not_first": _manifest_not_first,
    "dotdot": _unsafe("inductor/../../../evil.txt"), "dotdot_top": _unsafe("../evil.txt"),
    "absolute": _unsafe("/tmp/sd3plugin-evil.txt"),
    "symlink": _unsafe("inductor/ab/link", "sym", "/etc/passwd"),
    "hardlink": _unsafe("inductor/ab/hard", "hard", "/etc/passwd"),
    "device": _unsafe("inductor/ab/dev", "chr"), "fifo": _unsafe("inductor/ab/fifo", "fifo"),
    "stray_top_level": _unsafe("evil.sh"),
    "file_and_folder": _file_and_folder,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archive_is_refused_and_changes_nothing(case, tmp_path, packed, existing, capsys):
    _, archive, _ = packed
    bad, message = BAD[case](tmp_path, archive)
    before, parent_before = snapshot(existing), sorted(p.name for p in existing.parent.iterdir())
    code, data, text = cli("install", str(bad), "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == EXIT["corrupt"], text
    assert data["ok"] is False and message in data["error"]
    assert_untouched(existing, before, parent_before)
    assert not Path("/tmp/sd3plugin-evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    # --force never skips checksums or safety
    code, _, _ = cli("install", str(bad), "--cache-dir", str(existing), "--force", capsys=capsys)
    assert code == EXIT["corrupt"]
    assert_untouched(existing, before, parent_before)


def test_bad_archive_into_a_new_dir_creates_nothing(tmp_path, packed, capsys):
    _, archive, _ = packed
    bad, _ = _tampered(tmp_path, archive)
    target = tmp_path / "fresh"
    code, _, _ = cli("install", str(bad), "--cache-dir", str(target), capsys=capsys)
    assert code == EXIT["corrupt"] and not target.exists()


def test_archive_from_another_torch_is_incompatible_unless_forced(tmp_path, existing, capsys):
    other = make_cache(tmp_path / "other", torch_version="2.0.0+cu118")
    archive = tmp_path / "other.tar.zst"
    assert cli("pack", "--cache-dir", str(other), "-o", str(archive), capsys=capsys)[0] == 0
    before, parent_before = snapshot(existing), sorted(p.name for p in existing.parent.iterdir())
    code, data, text = cli("install", str(archive), "--cache-dir", str(existing), "--json", capsys=capsys)
    assert code == EXIT["incompatible"], text
    assert "torch 2.0.0+cu118 (archive) vs " in data["error"] and "--force" in data["error"]
    assert_untouched(existing, before, parent_before)
    code, data, text = cli("install", str(archive), "--cache-dir", str(existing), "--force", "--json",
                           capsys=capsys)
    assert code == 0, text
    assert any("forced: torch 2.0.0+cu118" in w for w in data["warnings"])
    assert json.loads((existing / store.INSTALLED).read_text())["forced"] is True
    # ls marks it, prune --incompatible removes it
    code, data, _ = cli("ls", "--cache-dir", str(existing), "--json", capsys=capsys)
    entry = next(e for e in data["entries"] if e["fingerprint"] == FP)
    assert entry["compatible"] is False and "torch" in entry["incompatible_because"][0]
    code, data, _ = cli("prune", "--cache-dir", str(existing), "--incompatible", "--yes", "--json", capsys=capsys)
    assert code == 0 and data["removed"] == [FP]


def test_compatibility_names_what_differs():
    here = environment()
    errors, warnings = compatibility({**here, "torch": "1.0", "diffusers": "0.1"}, here, "cuda")
    assert errors == [f"torch 1.0 (archive) vs {here['torch']} (here)"]
    assert warnings == [f"diffusers 0.1 (archive) vs {here['diffusers']} (here)"]
    gpu = {**here, "gpu": "NVIDIA H100", "gpu_capability": "sm_90"}
    assert compatibility(gpu, here, "cpu") == ([], [])  # CPU artefacts do not care about the GPU
    errors, _ = compatibility(gpu, {**here, "gpu": "NVIDIA A100", "gpu_capability": "sm_80"}, "cuda")
    assert errors == ["gpu_capability sm_90 (archive) vs sm_80 (here)"]
    # No GPU visible (a docker build): the GPU cannot be checked here, only warned about
    errors, warnings = compatibility({**gpu, "triton": "3.6.0"}, {**here, "gpu": "cpu", "gpu_capability": "cpu"},
                                     "cuda")
    assert errors == [] and "no GPU visible here" in warnings[0] and "sm_90" in warnings[0]


# -- other failures --------------------------------------------------------------------------------------
def test_missing_archive_and_empty_cache(tmp_path, capsys):
    code, data, _ = cli("install", str(tmp_path / "nope.tar.zst"), "--cache-dir", str(tmp_path / "c"), "--json",
                        capsys=capsys)
    assert code == EXIT["not_found"] and "does not exist" in data["error"]
    code, data, _ = cli("pack", "--cache-dir", str(tmp_path / "empty"), "-o", str(tmp_path / "a.tar.zst"),
                        "--json", capsys=capsys)
    assert code == EXIT["not_found"] and "warm" in data["error"]
    assert not (tmp_path / "a.tar.zst").exists()


def test_install_target_that_is_a_file(tmp_path, packed, capsys):
    _, archive, _ = packed
    target = tmp_path / "file"
    target.write_text("x")
    code, _, text = cli("install", str(archive), "--cache-dir", str(target), capsys=capsys)
    assert code == EXIT["cannot_write"] and "not a folder" in text and target.read_text() == "x"


def test_locked_cache_dir_times_out_with_its_exit_code(tmp_path, packed, existing, capsys):
    _, archive, _ = packed
    before = snapshot(existing)
    with FileLock(str(existing / ".lock")):
        code, data, _ = cli("install", str(archive), "--cache-dir", str(existing), "--lock-timeout", "0.2",
                            "--json", capsys=capsys)
    assert code == EXIT["locked"] and "locked by another" in data["error"]
    assert snapshot(existing) == before


# -- ls / info / prune / clear -------------------------------------------------------------------------
def test_ls_and_info(tmp_path, packed, capsys):
    src, archive, digest = packed
    code, data, _ = cli("ls", "--cache-dir", str(src), "--json", capsys=capsys)
    assert code == 0 and [e["fingerprint"] for e in data["entries"]] == [FP]
    assert data["entries"][0]["compatible"] is True and data["entries"][0]["size_bytes"] > 2700
    assert data["inductor_bytes"] >= 4096
    code, _, text = cli("ls", "--cache-dir", str(src), capsys=capsys)
    assert FP in text and "64x64/b1" in text and "[ok]" in text
    code, data, _ = cli("info", str(archive), "--json", capsys=capsys)
    assert code == 0 and data["manifest"]["fingerprint"] == FP and data["files"] == 4 and data["compatible"]
    code, data, _ = cli("info", FP[:6], "--cache-dir", str(src), "--json", capsys=capsys)
    assert code == 0 and data["entries"][0]["composed_config"] == {"model": "tiny"}
    code, data, _ = cli("info", "feedbeef", "--cache-dir", str(src), "--json", capsys=capsys)
    assert code == EXIT["not_found"]


def test_prune_and_clear_need_confirmation(tmp_path, capsys):
    root = make_cache(tmp_path / "c")
    before = snapshot(root)
    code, _, text = cli("clear", "--cache-dir", str(root), capsys=capsys)  # no terminal under pytest
    assert code == EXIT["usage"] and "--yes" in text and snapshot(root) == before
    code, _, text = cli("prune", "--cache-dir", str(root), "--fingerprint", FP[:4], capsys=capsys)
    assert code == EXIT["usage"] and snapshot(root) == before
    code, _, text = cli("prune", "--cache-dir", str(root), "--yes", capsys=capsys)
    assert code == EXIT["usage"] and "--fingerprint" in text
    code, data, _ = cli("prune", "--cache-dir", str(root), "--older-than", "1", "--yes", "--json", capsys=capsys)
    assert code == 0 and data["removed"] == []  # just written
    code, data, _ = cli("prune", "--cache-dir", str(root), "--fingerprint", FP[:4], "--yes", "--json",
                        capsys=capsys)
    assert code == 0 and data["removed"] == [FP] and not (root / "entries" / FP).exists()
    code, data, _ = cli("clear", "--cache-dir", str(root), "--yes", "--json", capsys=capsys)
    assert code == 0 and set(data["removed"]) == {"entries", "inductor"}
    assert not (root / "inductor").exists() and (root / "models" / "weights.bin").is_file()


# -- warm / verify without compiling -------------------------------------------------------------------
def test_warm_refuses_freezing_and_eager(tmp_path, capsys):
    code, data, _ = cli("warm", "--cache-dir", str(tmp_path / "c"), "mode=seed", "--json", capsys=capsys)
    assert code == EXIT["usage"] and "freezing" in data["error"] and "depend on weight values" in data["error"]
    code, data, _ = cli("warm", "--cache-dir", str(tmp_path / "c"), "backend=eager", "--json", capsys=capsys)
    assert code == EXIT["usage"] and "nothing to warm" in data["error"]
    code, data, _ = cli("warm", "--cache-dir", str(tmp_path / "c"), "--resolutions", "64x6x", "--json",
                        capsys=capsys)
    assert code == EXIT["usage"] and "WIDTHxHEIGHT" in data["error"]
    code, data, _ = cli("warm", "--cache-dir", str(tmp_path / "c"), "--resolutions", "63x64", "--json",
                        capsys=capsys)
    assert code == EXIT["usage"] and "multiple of" in data["error"]
    assert not (tmp_path / "c" / "entries").exists()


def test_verify_without_cache_is_not_found(tmp_path, capsys):
    code, data, _ = cli("verify", "--cache-dir", str(tmp_path / "c"), "--json", capsys=capsys)
    assert code == EXIT["not_found"] and "warm" in data["error"]


def test_verify_exits_5_when_the_fresh_process_compiled(tmp_path, capsys, monkeypatch):
    from sd3plugin.apps import verify as verify_mod
    from sd3plugin.config import compose
    from sd3plugin.cache.manifest import fingerprint

    root = make_cache(tmp_path / "c")
    fp = fingerprint(compose(None, [f"cache_dir={root}"]))
    os.rename(root / "entries" / FP, root / "entries" / fp)
    meta = json.loads((root / "entries" / fp / "entry.json").read_text())
    store.write_json(root / "entries" / fp / "entry.json", {**meta, "fingerprint": fp})
    child = {"time_to_first_image_seconds": 30.0, "import_seconds": 1, "load_seconds": 1, "first_image_seconds": 28,
             "shape": meta["shapes"][0], "status": "compiled", "fresh_compilations": 2, "fxgraph_cache_miss": 2,
             "fxgraph_cache_hit": 0, "autograd_cache_hit": 0}
    fake = types.SimpleNamespace(returncode=0, stdout="noise\n" + verify_mod.MARK + json.dumps(child), stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: fake)
    code, data, _ = cli("verify", "--cache-dir", str(root), "--json", capsys=capsys)
    assert code == EXIT["compiled"]
    assert data["fresh_compilations"] == 2 and "compiled 2 graph(s)" in data["error"]


def test_activate_is_cheap_without_a_cache(tmp_path):
    info = activate(tmp_path / "c")
    assert info["cache"]["megacache_loaded"] == [] and info["cache"]["load_seconds"] == 0.0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")


def test_activate_skips_blobs_from_another_torch(tmp_path):
    root = make_cache(tmp_path / "c", torch_version="1.0")
    info = activate(root)
    assert info["cache"]["megacache_loaded"] == []
    assert "torch 1.0 (archive)" in info["cache"]["megacache_skipped"][0]["reason"]


def test_fingerprint_follows_the_architecture_not_the_model_name(tiny_path, tmp_path):
    from sd3plugin.cache.manifest import compile_config, fingerprint
    from sd3plugin.config import compose

    preset = compose(None, ["model=tiny"])
    folder = compose(None, [f"model={tiny_path}"])
    assert fingerprint(preset) == fingerprint(folder)  # warm with the preset, serve the real folder
    assert compile_config(folder)["architecture"]["num_layers"] == 2
    assert fingerprint(compose(None, ["model=tiny", "mode=max-autotune"])) != fingerprint(preset)
    assert fingerprint(compose(None, ["model=tiny", "steps=3", "prompt=x"])) == fingerprint(preset)
    assert fingerprint(compose(None, ["model=sd3-medium"])) != fingerprint(preset)
    unknown = compose(None, [f"model={tmp_path / 'nowhere'}"])
    assert compile_config(unknown)["architecture"] is None and compile_config(unknown)["model"].endswith("nowhere")


def test_shapes_to_warm():
    from sd3plugin.apps.warm import parse_batch_sizes, parse_resolutions, plan_shapes
    from sd3plugin.config import compose
    from sd3plugin.errors import ConfigError

    assert parse_resolutions("1024x1024, 768x1344,512,768x1344") == [(1024, 1024), (768, 1344), (512, 512)]
    assert parse_batch_sizes("1,2,2") == [1, 2]
    with pytest.raises(ConfigError, match="at least 1"):
        parse_batch_sizes("0")
    cfg = compose(None, ["model=tiny"])
    assert plan_shapes(cfg, [], []) == [{"width": 64, "height": 64, "batch_size": 1, "guidance": True}]
    shapes = plan_shapes(compose(None, ["guidance_scale=1.0"]), [(64, 32), (32, 32)], [1, 2])
    assert [(s["width"], s["height"], s["batch_size"]) for s in shapes] == [(64, 32, 1), (64, 32, 2), (32, 32, 1),
                                                                            (32, 32, 2)]
    assert not shapes[0]["guidance"]
    with pytest.raises(ConfigError, match="multiple of"):
        plan_shapes(cfg, [(63, 64)], [1])
