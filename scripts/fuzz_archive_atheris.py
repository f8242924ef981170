"""Coverage-guided fuzzing of the cache archive reader with atheris (libFuzzer for Python). Optional: atheris
is not a dependency of sd3plugin (``pip install atheris``); without it the script prints one line and exits 2.

    python scripts/fuzz_archive_atheris.py [CORPUS_DIR] [-max_total_time=600] [libFuzzer flags...]

Run from the repository root. Each input goes through ``sd3plugin.cli.cache.main`` as ``info ARCHIVE`` and
``install ARCHIVE --cache-dir <fresh dir>``, as the CLI runs them. The first byte of an input picks how the rest
becomes an archive: even, a tar stream that is zstd-compressed (the fuzzer mutates the tar grammar); odd, the
archive file's bytes as they are (zstd framing). The seed corpus (written into CORPUS_DIR when it is empty,
default a temporary folder) is a real packed archive of a small crafted cache, both ways.

A crash is any of: an exit code outside the documented set for that input (``info``: 0 or 4; ``install``:
0, 3 or 4; 1 "unexpected error" is a bug), more than one line on stderr, anything written outside the
fresh cache dir, or a peak RSS over ``-rss_limit_mb`` (default here 400 MB above the RSS at start-up, which
includes torch). libFuzzer writes the crashing input as ``crash-<sha1>``; reproduce it with
``sd3plugin-cache install`` after removing the first byte (and compressing it with ``zstd`` when that byte
is even).
"""
from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INFO_CODES, INSTALL_CODES = {0, 4}, {0, 3, 4}

try:
    import atheris
except ImportError:
    print("fuzz_archive_atheris.py: atheris is not installed; `pip install atheris` (optional: the test suite's "
          "tests/test_cache_fuzz.py needs only hypothesis)", file=sys.stderr)
    sys.exit(2)

sys.path.insert(0, str(ROOT))
with atheris.instrument_imports(include=["sd3plugin.cache"]):
    import pkgutil

    import sd3plugin.cache

    for mod in pkgutil.iter_modules(sd3plugin.cache.__path__):
        __import__(f"sd3plugin.cache.{mod.name}")
import zstandard  # noqa: E402

from sd3plugin.cli.cache import main  # noqa: E402

TOP = Path(tempfile.mkdtemp(prefix="sd3-atheris-"))
WORK = TOP / "run"  # the archive and the cache dir of each input; nothing else may appear here
WORK.mkdir()
ARCHIVE = WORK / "archive.tar.zst"


def _seed(corpus: Path) -> None:
    """A real archive, packed from the small crafted cache of the tests, as both kinds of input."""
    from tests.test_cache_archive import make_cache

    src = make_cache(TOP / "seed-src")
    out = TOP / "seed.tar.zst"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["pack", "--cache-dir", str(src), "-o", str(out)]) == 0
    data = out.read_bytes()
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "seed-tar").write_bytes(b"\0" + tar)
    (corpus / "seed-zst").write_bytes(b"\1" + data)
    shutil.rmtree(src)
    for p in TOP.glob("seed.tar.zst*"):
        p.unlink()


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    if data[0] % 2 == 0:
        body = zstandard.ZstdCompressor(level=1).compress(body)
    ARCHIVE.write_bytes(body)
    cache = WORK / "cache"
    for argv, allowed in ((["info", str(ARCHIVE), "--json"], INFO_CODES),
                          (["install", str(ARCHIVE), "--cache-dir", str(cache), "--json", "--lock-timeout", "1"],
                           INSTALL_CODES)):
        code, err = _run(argv)
        if code not in allowed:
            raise RuntimeError(f"{argv[0]}: exit {code} (allowed {sorted(allowed)}): {err.strip()[-300:]}")
        if code != 0 and (len(err.strip().splitlines()) != 1 or "Traceback" in err):
            raise RuntimeError(f"{argv[0]}: not one line on stderr: {err[-500:]!r}")
    shutil.rmtree(cache, ignore_errors=True)
    left = sorted(set(os.listdir(WORK)) - {"archive.tar.zst"})
    if left:
        raise RuntimeError(f"written outside the cache dir: {left}")


def run() -> None:
    args = [a for a in sys.argv[1:]]
    corpora = [a for a in args if not a.startswith("-")]
    if not corpora:
        corpora = [str(TOP / "corpus")]
        args.append(corpora[0])
    if not any(Path(c).is_dir() and any(Path(c).iterdir()) for c in corpora):
        _seed(Path(corpora[0]))
    from sd3plugin.cache.manifest import environment

    environment()  # imports torch, as install does, before the RSS baseline
    if not any(a.startswith("-rss_limit_mb=") for a in args):
        base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        args.append(f"-rss_limit_mb={base_mb + 400}")
    os.environ.pop("SD3PLUGIN_TRUSTED_KEY", None)
    atheris.Setup([sys.argv[0], *args], test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(TOP, ignore_errors=True)


if __name__ == "__main__":
    run()
