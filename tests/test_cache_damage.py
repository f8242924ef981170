"""Damage found by content, and paths from cache metadata confined to the cache dir (issue 20, items 5, 6).

Real files on disk, copies made with the real ``cp -a``, the CLI run as a user runs it (a subprocess) where
it matters. Each case checks what a server's activation (``activate``) and ``verify`` do, and that nothing
outside the cache dir is read, moved or deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from sd3plugin.cache import store
from sd3plugin.cache.lock import LOCK_NAME, maintain
from sd3plugin.cache.megacache import load_entries
from sd3plugin.cli.cache import main
from sd3plugin.transforms.settings import activate

from .test_cache_archive import FP, cli, make_cache

BLOB = f"entries/{FP}/aaaa.megacache"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A cache dir with an archive installed (checksums.json records every file)."""
    base = tmp_path_factory.mktemp("installed")
    src = make_cache(base / "src")
    assert main(["pack", "--cache-dir", str(src), "-o", str(base / "a.tar.zst")]) == 0
    assert main(["install", str(base / "a.tar.zst"), "--cache-dir", str(base / "cache")]) == 0
    return base / "cache"


def cp_a(src: Path, dst: Path) -> Path:
    """What a backup restore, rsync or an image layer does: every file a new inode, mtimes kept."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def flip(path: Path, at: int = 100) -> None:
    """Flip one byte in place, size and mtime kept."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): (sha(p) if p.is_file() and not p.is_symlink() else "other")
            for p in sorted(path.rglob("*"))}


def run_cli(*argv: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", "import sys; from sd3plugin.cli.cache import main; "
                           "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return proc.returncode, proc.stdout + proc.stderr


# -- item 5: damage follows content ------------------------------------------------------------------------
def test_a_clean_copy_is_hashed_once_then_trusted(tmp_path, installed, monkeypatch):
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr("sd3plugin.cache.checksums.sha256_file", lambda p: hashed.append(p) or real(p))
    assert maintain(installed)["repaired"] == [] and hashed == []  # as installed: nothing to hash
    monkeypatch.undo()
    copy = cp_a(installed, tmp_path / "copy")
    assert activate(copy)["cache"]["repaired"] == []
    records = store.read_checksums(copy)
    assert records[BLOB]["ino"] == (copy / BLOB).stat().st_ino  # the copy's identity is recorded now
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr("sd3plugin.cache.checksums.sha256_file", lambda p: hashed.append(p) or real(p))
    assert maintain(copy)["repaired"] == [] and hashed == []


def test_flipped_bytes_in_a_copy_are_found_by_activation(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    flip(copy / BLOB)
    flip(copy / "inductor" / "ab" / "kernel.so")
    info = activate(copy)
    found = {r["file"]: r["problem"] for r in info["cache"]["repaired"]}
    assert found == {BLOB: "content changed (sha256 mismatch)",
                     "inductor/ab/kernel.so": "content changed (sha256 mismatch)"}
    assert not (copy / "inductor" / "ab" / "kernel.so").exists() and not (copy / "entries" / FP).exists()
    assert info["cache"]["megacache_loaded"] == []
    assert (installed / "inductor" / "ab" / "kernel.so").exists()  # the original is untouched


def test_a_damaged_blob_is_not_loaded_while_another_process_holds_the_lock(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    flip(copy / BLOB)
    with FileLock(str(copy / LOCK_NAME)):  # a warm or install in progress: no repair now
        info = activate(copy)
    assert info["cache"]["repaired"] == [] and info["cache"]["megacache_loaded"] == []
    [skipped] = info["cache"]["megacache_skipped"]
    assert skipped["blob"] == str(copy / BLOB) and "damaged" in skipped["reason"]


def test_a_replaced_generated_source_with_its_mtime_kept_is_removed_before_use(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    kernel = copy / "inductor" / "ab" / "kernel.py"
    st = kernel.stat()
    other = kernel.with_name("evil.tmp")
    other.write_text("print('kernel')\n".replace("kernel", "evil!!"))  # same size, other code
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, kernel)
    assert kernel.stat().st_size == st.st_size and kernel.stat().st_mtime_ns == st.st_mtime_ns
    found = {r["file"]: r for r in activate(copy)["cache"]["repaired"]}
    assert "inductor/ab/kernel.py" in found and not kernel.exists()


@pytest.mark.parametrize("content", [b"", b"{}", b"{\"format\": 1}", b"not json"])
def test_a_lost_checksums_record_means_nothing_is_used(tmp_path, installed, content):
    copy = cp_a(installed, tmp_path / "copy")
    (copy / store.CHECKSUMS).write_bytes(content)
    (copy / "models").mkdir()
    (copy / "models" / "m.bin").write_bytes(b"m")
    info = activate(copy)
    [item] = info["cache"]["repaired"]
    assert item["file"] == store.CHECKSUMS and "no file of the cache can be checked" in item["problem"]
    assert "empty" in item["problem"] if content in (b"", b"{}") else "unreadable" in item["problem"]
    assert info["cache"]["megacache_loaded"] == []
    assert list(store.iter_files(copy)) == [] and (copy / "models" / "m.bin").exists()
    assert activate(copy)["cache"]["repaired"] == []  # a valid empty record now: torch fills the cache again


def test_a_deleted_checksums_record_of_an_install_is_noticed(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    (copy / store.CHECKSUMS).unlink()
    [item] = activate(copy)["cache"]["repaired"]
    assert "missing" in item["problem"] and not (copy / "entries").exists()


def test_a_lost_record_refuses_blobs_even_without_the_lock(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    (copy / store.CHECKSUMS).write_bytes(b"")
    result = load_entries(copy)
    assert result["loaded"] == [] and "cannot be checked" in result["skipped"][0]["reason"]


def test_verify_hashes_every_file_and_reports_deleted_ones(tmp_path, installed, capsys, monkeypatch):
    copy = cp_a(installed, tmp_path / "copy")
    maintain(copy)  # the copy's identities recorded: only a full check hashes now
    (copy / "inductor" / "ab" / "kernel.py").unlink()
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr("sd3plugin.cache.checksums.sha256_file", lambda p: hashed.append(p) or real(p))
    result = maintain(copy, full=True)  # what `sd3plugin-cache verify` runs before its child process
    assert result["repaired"] == [{"file": "inductor/ab/kernel.py", "problem": "deleted",
                                   "action": "record dropped (compiled again at the next run)"}]
    assert {Path(p).relative_to(copy).as_posix() for p in hashed} >= set(store.read_checksums(copy))
    assert "inductor/ab/kernel.py" not in store.read_checksums(copy)


def test_files_torch_wrote_after_the_install_are_recorded_by_verify(tmp_path, installed):
    copy = cp_a(installed, tmp_path / "copy")
    new = copy / "inductor" / "cd" / "new.py"
    new.parent.mkdir()
    new.write_text("x = 1\n")
    maintain(copy, full=True)
    assert store.read_checksums(copy)["inductor/cd/new.py"]["sha256"] == sha(new)
    new.write_text("x = 2\n")
    assert [r["file"] for r in maintain(copy)["repaired"]] == ["inductor/cd/new.py"]


# -- item 6: paths read from cache metadata stay in the cache dir ---------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "outside"
    (d / "sub").mkdir(parents=True)
    (d / "victim").write_bytes(b"precious")
    (d / "victim.megacache").write_bytes(b"precious blob")
    (d / "empty").mkdir()
    return d


JOURNALS = {  # planted journals of an "interrupted install", each naming a place outside the cache dir
    # (a missing source: a rollback would take the target "back out" into the staging folder, then remove it)
    "target ..": {"ops": [["new/gone", "../outside/victim", None]], "mkdirs": []},
    "target deep ..": {"ops": [["new/gone", "inductor/../../outside/victim", None]], "mkdirs": []},
    "target absolute": {"ops": [["new/gone", "{outside}/victim", None]], "mkdirs": []},
    "source ..": {"ops": [["../../outside/victim", "inductor/ab/kernel.py", None]], "mkdirs": []},
    "backup ..": {"ops": [["new/x", "inductor/ab/gone.py", "../../outside/victim"]], "mkdirs": []},
    "mkdir ..": {"ops": [], "mkdirs": ["../outside/empty"]},
    "target through a link": {"ops": [["new/gone", "inductor/out/victim", None]], "mkdirs": []},
    "not a list": {"ops": "../outside/victim", "mkdirs": []},
}


def plant_journal(cache: Path, outside: Path, journal: dict) -> None:
    staging = cache / ".install-planted"
    (staging / "new").mkdir(parents=True)
    (staging / "new" / "x").write_bytes(b"x")
    text = json.dumps({"state": "moving", **journal}).replace("{outside}", str(outside))
    (staging / store.JOURNAL).write_text(text)
    if not (cache / "inductor" / "out").exists():
        (cache / "inductor" / "out").symlink_to(outside)


@pytest.mark.parametrize("case", sorted(JOURNALS))
def test_a_planted_journal_never_touches_outside(tmp_path, installed, outside, case):
    copy = cp_a(installed, tmp_path / "copy")
    plant_journal(copy, outside, JOURNALS[case])
    want, kernel = tree(outside), sha(copy / "inductor" / "ab" / "kernel.py")
    recovered = activate(copy)["cache"]["recovered"]
    assert tree(outside) == want
    assert len(recovered) == 1 and "refused the journal of .install-planted" in recovered[0]
    assert not (copy / ".install-planted").exists() and sha(copy / "inductor" / "ab" / "kernel.py") == kernel


def test_prune_with_a_planted_journal_is_refused_as_the_user_runs_it(tmp_path, installed, outside):
    copy = cp_a(installed, tmp_path / "copy")
    plant_journal(copy, outside, JOURNALS["target .."])
    want = tree(outside)
    code, text = run_cli("prune", "--cache-dir", str(copy), "--older-than", "100000", "--yes")
    assert code == 0 and "refused the journal" in text and "Traceback" not in text
    assert tree(outside) == want


RECORDS = ["../outside/victim", "entries/../../outside/victim", "{outside}/victim", "inductor/out/victim",
           "inductor/out/sub", "models/../../outside/victim", "inductor/ab/\0x"]


def test_checksums_records_naming_outside_are_dropped_never_followed(tmp_path, installed, outside):
    copy = cp_a(installed, tmp_path / "copy")
    (copy / "inductor" / "out").symlink_to(outside)
    records = store.read_checksums(copy)
    planted = [r.replace("{outside}", str(outside)) for r in RECORDS]
    for rel in planted:  # wrong size and hash: a record that would make repair remove the path
        records[rel] = {"size": 1, "sha256": "0" * 64, "ino": 1, "ctime_ns": 1, "mtime_ns": 1}
    store.write_json(copy / store.CHECKSUMS, {"format": 1, "files": records})
    want = tree(outside)
    repaired = {r["file"]: r for r in activate(copy)["cache"]["repaired"]}
    assert set(repaired) == set(planted)
    assert all("nothing outside the cache dir was touched" in r["action"] for r in repaired.values())
    assert tree(outside) == want and not set(planted) & set(store.read_checksums(copy))
    assert maintain(copy, full=True)["repaired"] == []


def test_entry_metadata_never_names_a_file_outside(tmp_path, installed, outside):
    copy = cp_a(installed, tmp_path / "copy")
    entry = copy / "entries" / FP / store.ENTRY_FILE
    meta = json.loads(entry.read_text())
    meta["fingerprint"] = "../../../outside"
    meta["blobs"]["../../../outside/victim.megacache"] = {"shapes": []}
    meta["blobs"][str(outside / "victim.megacache")] = {"shapes": []}
    store.write_json(entry, meta)
    store.refresh_checksums(copy)
    (copy / "entries" / "linked").symlink_to(outside)  # an entry folder that is a link
    (outside / store.ENTRY_FILE).write_text(json.dumps({"fingerprint": "linked", "blobs": {}}))
    (outside / ".x.tmp").write_bytes(b"not a leftover of ours")
    [e] = store.list_entries(copy)
    assert e["fingerprint"] == FP and e["recorded_fingerprint"] == "../../../outside"
    assert store.blob_paths(e) == [copy / BLOB]
    assert not any(str(outside) in x["path"] for x in store.leftovers(copy))
    want = tree(outside)
    code, text = run_cli("prune", "--cache-dir", str(copy), "--fingerprint", FP, "--yes")
    assert code == 0 and tree(outside) == want and not (copy / "entries" / FP).exists(), text
    code, text = run_cli("clear", "--cache-dir", str(copy), "--yes")
    assert code == 0 and tree(outside) == want, text


def test_precompiled_index_never_names_a_file_outside(tmp_path, installed, outside):
    from sd3plugin.cache import precompiled
    from sd3plugin.cache.manifest import environment

    copy = cp_a(installed, tmp_path / "copy")
    env = environment()
    index = {"format": precompiled.FORMAT, "environment": {k: env.get(k) for k in precompiled.MATCH},
             "artefacts": [{"file": f"../../../../outside/victim{precompiled.SUFFIX}", "sha256": "0", "size": 1},
                           {"file": str(outside / "victim")}]}
    store.write_json(precompiled.folder(copy, FP) / precompiled.INDEX, index)
    ok, bad, _ = precompiled.usable(copy, FP, env)
    assert ok == [] and [b["reason"] for b in bad] == ["not a file name of the precompiled folder; not read"] * 2


def test_links_and_fifos_in_the_cache_dir_are_neither_followed_nor_waited_on(tmp_path, installed, outside):
    copy = cp_a(installed, tmp_path / "copy")
    entry = copy / "entries" / FP / store.ENTRY_FILE
    (outside / "entry.json").write_text(entry.read_text())
    entry.unlink()
    entry.symlink_to(outside / "entry.json")  # an entry.json that is a link: not read
    assert store.list_entries(copy) == []
    (copy / store.CHECKSUMS).unlink()
    os.mkfifo(copy / store.CHECKSUMS)  # a FIFO would block a plain open() forever
    code = ("import json, sys; from sd3plugin.transforms.settings import activate; "
            "print(json.dumps(activate(sys.argv[1])['cache']['repaired']))")
    proc = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [item] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "checksums.json is unreadable" in item["problem"] and not (copy / "entries").exists()
    assert (outside / "entry.json").exists()


def test_everything_warm_writes_is_recorded_as_it_is(tmp_path, monkeypatch):
    """warm writes its blob, then the precompiled blocks and entry.json again: all recorded, none damage."""
    from sd3plugin.apps import warm as warmup
    from sd3plugin.config import compose

    def fake_compile(cfg, shapes, steps, progress):
        per_shape = [dict(s, seconds=0.1, fresh_compilations=1, fxgraph_cache_hit=0) for s in shapes]
        return (per_shape, {"backend": "inductor", "mode": {"spec": "x"}}, (b"blob" * 64, {"inductor": 1}),
                {"artefacts": [({"key": "k1"}, b"block" * 50)], "sampled_keys": ["k1"]})

    monkeypatch.setattr(warmup, "_compile_shapes", fake_compile)
    root = tmp_path / "cache"
    cfg = compose(None, ["model=tiny", "device=cpu", f"cache_dir={root}"])
    r = warmup.warm(cfg, [{"width": 32, "height": 32, "batch_size": 1, "guidance": True}], steps=1,
                    lock_timeout=10, progress=False)
    recorded = set(store.read_checksums(root))
    assert {rel for rel, _ in store.iter_files(root)} == recorded
    assert any(rel.endswith(".pt2") for rel in recorded) and r["precompiled"]["artefacts"] == 1
    assert store.check_files(root, full=True) == [] and maintain(root)["repaired"] == []


def test_a_damaged_precompiled_block_is_left_to_its_index_check(tmp_path, installed):
    from sd3plugin.cache import precompiled
    from sd3plugin.cache.manifest import environment

    src = cp_a(installed, tmp_path / "src")
    env = environment()
    index = precompiled.write(src, FP, [({"key": "a"}, b"block a" * 40), ({"key": "b"}, b"block b" * 40)], [], env)
    store.refresh_checksums(src)
    copy = cp_a(src, tmp_path / "copy")
    damaged = precompiled.folder(copy, FP) / index["artefacts"][0]["file"]
    flip(damaged)
    [item] = activate(copy)["cache"]["repaired"]
    assert item["file"] == damaged.relative_to(copy).as_posix() and "precompiled index check" in item["action"]
    assert (copy / "entries" / FP / store.ENTRY_FILE).exists()  # the entry and its other block stay
    ok, bad, _ = precompiled.usable(copy, FP, env)
    assert [r["key"] for r, _ in ok] == ["b"] and "sha256 mismatch" in bad[0]["reason"]
