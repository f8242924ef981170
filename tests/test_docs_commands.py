"""Every command of README.md and docs/**/*.md, run as a newcomer runs it (issue 16).

Each fenced block must name its language. Each line of a ``bash``/``sh`` block (of a ``console`` block: each
``$ `` line), joined over ``\\`` and multi-line quotes, comments removed and split at ``&&``, is one command;
every command must sit in exactly one of the tables below (matched by its exact text, or for SKIPPED by a
substring), so a new docs command fails the fast lane until it is classified:

- RUNS (a): runs on this CPU machine as written; the exit code is 0 and the files the docs promise appear.
- REFUSES (b): cannot run here (a GPU feature, a preset larger than the memory, a Hub id without network);
  it must end with its exit code and one line on stderr naming the problem, never a traceback.
- CHAINED: needs what an earlier command of its block made (a cache to pack, an archive to install, a model
  folder to verify); CHAINS runs each such sequence as a whole, with the tiny preset in place of the doc's
  model (written out in each step).
- SKIPPED (c): not runnable in a test, with the reason (installs, GPU benchmarks, docker, other environments).

Python blocks must compile, and each ``sd3plugin.*`` name they use must exist. They are not run: every one
needs a GPU, a Hub model or a pipeline the snippet does not build, and none says to substitute the tiny
preset.

The slow lane runs RUNS and REFUSES from the root of a fresh clone (``git clone`` of this checkout, plus its
uncommitted changes) and again from an empty folder elsewhere, with the installed tools on PATH, HOME and
SD3PLUGIN_CACHE_DIR inside a temporary folder and HF_HUB_OFFLINE=1; the two passes share one cache dir, so the
second one starts warm. The two CHAINS run once each, the README's from the clone root and docs/cache.md's
from the other folder, so every cache command runs from both.
"""
from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "console"}
LANGUAGES = SHELL | {"python", "json", "dockerfile", "text"}
RUN_OUTPUTS = ("outputs/*/*/image_00.png", "outputs/*/*/report.md", "outputs/*/*/report.json")
RUN_SUMMARY = "sd3plugin-run: wrote"


# -- extraction --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    text: str


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced blocks of a Markdown file (indentation of a fence inside a list removed)."""
    found, open_, body = [], None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if open_ is None:
            m = _FENCE.match(line)
            if m:
                open_, body = (number, len(m.group(1)), m.group(2), m.group(3).lower()), []
            continue
        start, indent, fence, lang = open_
        if line.strip() == fence:
            found.append(Block(str(path.relative_to(root)), start, lang, "\n".join(body)))
            open_ = None
        else:
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
    assert open_ is None, f"{path}:{open_[0]}: unclosed code fence"
    return found


def _scan(text: str) -> tuple[list[tuple[str, str | None]], bool]:
    """Each character of ``text`` outside comments with the quote open before it (None outside quotes), and
    whether a quote is still open at the end."""
    out, quote, escaped, comment = [], None, False, False
    for i, ch in enumerate(text):
        if comment:
            comment = ch != "\n"
            if comment:
                continue
        elif quote is None and not escaped and ch == "#" and (i == 0 or text[i - 1].isspace()):
            comment = True
            continue
        out.append((ch, quote))
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
    return out, quote is not None


def split_and(text: str) -> list[str]:
    """A command line without comments, split at ``&&`` outside quotes; outside quotes, each run of blanks
    becomes one space (inside quotes the text is kept as written)."""
    parts, current = [], ""
    chars, _ = _scan(text)
    for ch, quote in chars:
        if quote is None and ch == "&" and current.endswith("&"):
            parts.append(current[:-1])
            current = ""
        elif quote is None and ch.isspace():
            current += "" if current.endswith(" ") else " "
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def commands(block: Block) -> list[Command]:
    """The commands of a shell block."""
    found, pending, first = [], "", 0
    for offset, line in enumerate(block.text.splitlines(), 1):
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            first = block.line + offset
        pending += line
        chars, open_quote = _scan(pending)
        if open_quote:
            pending += "\n"
            continue
        if "".join(ch for ch, _ in chars).rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        found += [Command(block.doc, first, part) for part in split_and(pending)]
        pending = ""
    assert not pending.strip(), f"{block.doc}:{first}: command not finished at the end of its block"
    return found


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for path in doc_files(root) for b in blocks(path, root)]


def docs_commands(root: Path = ROOT) -> list[Command]:
    return [c for b in all_blocks(root) if b.lang in SHELL for c in commands(b)]


# -- classification ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runs:
    """Runs here as written: exit 0; ``files`` (globs in the working folder) appear; stdout holds ``says``."""
    files: tuple[str, ...] = ()
    says: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refuses:
    """Cannot run here: exit ``code`` and exactly one stderr line containing ``says``.

    ``memory=(preset, dtype)``: refused only where the preset does not fit the free host memory (on a larger
    machine it would build and run: not checked there). ``known_bug``: the refusal is not clean yet; the test
    expects it to fail (and fails once it passes, so that the entry is removed)."""
    code: int
    says: str
    memory: tuple[str, str] | None = None
    known_bug: str = ""


RUN = Runs(files=RUN_OUTPUTS, says=(RUN_SUMMARY,))
FP8_ON_CPU = Refuses(2, "needs an NVIDIA GPU with compute capability >= 8.9")
SD3_MEDIUM_TOO_BIG = Refuses(2, "model=sd3-medium (7.7 B parameters in float32) needs about",
                             memory=("sd3-medium", "float32"))

RUNS: dict[str, Runs] = {
    "sd3plugin-run": RUN,
    "sd3plugin-run dynamic=true height=192 width=256": RUN,
    "sd3plugin-run --cfg job mode=seed": Runs(says=(
        "spec: max-optimize:max-autotune:low-precision:cudagraphs:cache-all:freezing:benchmark",)),
    "sd3plugin-run --compiler-config '{\"mode\": \"max-optimize:max-autotune:low-precision\", "
    "\"memory_format\": \"channels_last\"}'": RUN,
    "sd3plugin-run --saved-image sd3.png": Runs(files=("sd3.png",) + RUN_OUTPUTS[1:], says=(RUN_SUMMARY,)),
    "sd3plugin-run --help": Runs(says=("usage: sd3plugin-run", "--saved-image PATH")),
    "sd3plugin-cache ls": Runs(says=(" entries, inductor/Triton files ",)),
    "sd3plugin-cache doctor": Runs(says=("backends:", "auto      -> inductor", "cache dir:")),
    "sd3plugin-run mode=max-speed dynamic=true height=192 width=256": RUN,
    "sd3plugin-run -m mode=default,max-speed": Runs(
        files=tuple(f"multirun/*/*/{n}/{f}" for n in (0, 1) for f in ("image_00.png", "report.md", "report.json")),
        says=(RUN_SUMMARY,)),
    "sd3plugin-run --compiler-config '{\"mode\": \"max-optimize:max-autotune:low-precision\", "
    "\"memory_format\": \"channels_last\", \"dynamic\": true}'": RUN,
    "sd3plugin-run quant=int8_dynamic": RUN,
    "sd3plugin-run quant=int8_dynamic \"quant.include=['transformer_blocks.*']\" "
    "\"quant.exclude=['*.norm1*','*.ff_context.*']\"": RUN,
    # docs/parallel.md: prints the torch.distributed.run command without checking the GPUs
    "sd3plugin-run parallel=cfg2 parallel.launch=print": Runs(
        says=("-m torch.distributed.run --standalone --nproc-per-node=2 -m sd3plugin.apps.run parallel=cfg2",)),
    # docs/step-cache.md (cache-dit, the `cache` extra, is installed in the test environment)
    "sd3plugin-run step_cache=fbcache": RUN,
    "python -m sd3plugin.config.modes_table": Runs(says=("| `max-optimize` | enable all graph optimizations |",)),
}

REFUSES: dict[str, Refuses] = {
    # docs/onediff-users.md, meant for the nexfort environment: in the main one an explicit backend=nexfort
    # is refused before anything loads, naming the fix
    "sd3plugin-run backend=nexfort mode=max-autotune": Refuses(
        2, "backend=nexfort cannot run here: nexfort is not installed"),
    "sd3plugin-run model=sd3-medium mode=max-speed": SD3_MEDIUM_TOO_BIG,
    "sd3plugin-run model=stabilityai/stable-diffusion-3-medium-diffusers prompt=\"a corgi astronaut\"": Refuses(
        2, "is neither a folder with model_index.json nor a reachable Hub id"),
    "sd3plugin-run model=sd3-medium dynamic=true height=768 width=1344": SD3_MEDIUM_TOO_BIG,
    "sd3plugin-run quant=fp8_e4m3_e4m3_dynamic": FP8_ON_CPU,
    "sd3plugin-run parallel=cfg2 model=sd3-medium height=1024 width=1024": Refuses(
        2, "parallel=cfg2 needs 2 CUDA GPUs (one process each) but this machine has no CUDA GPU"),
    "sd3plugin-run step_cache=dbcache mode=max-speed": Refuses(
        2, "step_cache=dbcache cannot run with CUDA graphs (mode=max-speed: token 'cudagraphs')"),
    "sd3plugin-bench model=stabilityai/stable-diffusion-3-medium-diffusers dtype=bfloat16 bench.step_cache=all": Refuses(
        2, "is neither a folder with model_index.json nor a reachable Hub id"),
    "sd3plugin-cache warm model=sd3-medium --resolutions 1024x1024,768x1344": SD3_MEDIUM_TOO_BIG,
    "sd3plugin-cache warm model=sd3-medium --resolutions 1024x1024,768x1344 --batch-sizes 1": SD3_MEDIUM_TOO_BIG,
    "sd3plugin-bench model=sd3-medium dtype=bfloat16 \"bench.variants='fast=mode=max-speed; "
    "fp8=mode=max-speed quant=fp8_e4m3_e4m3_dynamic'\"": Refuses(
        2, "model=sd3-medium (7.7 B parameters in bfloat16) needs about", memory=("sd3-medium", "bfloat16")),
    "sd3plugin-bench model=sd3-medium --compiler-config '{\"mode\": \"max-optimize:low-precision\", "
    "\"dynamic\": true}' --run_multiple_resolutions 1": SD3_MEDIUM_TOO_BIG,
    "sd3plugin-run quant=fp8_e4m3_e4m3_dynamic dtype=bfloat16": FP8_ON_CPU,
    "sd3plugin-run quant=fp8_e4m3_e4m3_dynamic_per_tensor": FP8_ON_CPU,
    "sd3plugin-run model=sd3-medium mode=max-speed quant=fp8_e4m3_e4m3_dynamic fp8_fused_activation=true": FP8_ON_CPU,
    "sd3plugin-run quant=fp8_e4m3_e4m3_dynamic dtype=bfloat16 "
    "\"quant.exclude=['transformer_blocks.0.*','transformer_blocks.23.*']\"": FP8_ON_CPU,
    # the placeholder path is checked first: also a clear message
    "sd3plugin-run --compiler-config '{\"mode\": \"quant:max-optimize:max-autotune:low-precision\", "
    "\"memory_format\": \"channels_last\"}' --quantize-config '{\"quant_type\": \"fp8_e4m3_e4m3_dynamic_per_tensor\"}' "
    "--quant-submodules-config-path /path/to/fp8_e4m3_per_tensor.json": Refuses(
        2, "quant.submodules_config_path='/path/to/fp8_e4m3_per_tensor.json' does not exist"),
    "python -m sd3plugin.apps.quality sensitivity --model sd3-medium --quant fp8_e4m3_e4m3_dynamic "
    "--out fp8_sd3m.json": Refuses(2, "needs an NVIDIA GPU with compute capability >= 8.9"),
    "python -m sd3plugin.apps.quality sensitivity --model /path/to/sd3-medium-diffusers --quant int8_dynamic "
    "--out int8.json": Refuses(2, "/path/to/sd3-medium-diffusers"),
}


@dataclass(frozen=True)
class Step:
    doc: str             # the docs command this step stands for ("" for a step the docs give in the text)
    run: str             # what runs: the docs command, tiny preset and the chain's folders substituted
    files: tuple[str, ...] = ()


# $CI: the cache of the machine that warms and packs; $SERVER: an empty cache dir where the archive is installed;
# $MODEL: the tiny pipeline folder that warm built (stands for /models/sd3...). Both warms use tiny's own sizes.
WARM_TINY = "sd3plugin-cache warm model=tiny --resolutions 64x64,128x128"
CHAINS: dict[str, tuple[str, tuple[Step, ...]]] = {
    "README.md": ("clone", (
        Step("sd3plugin-cache warm model=sd3-medium --resolutions 1024x1024,768x1344",
             f"SD3PLUGIN_CACHE_DIR=$CI {WARM_TINY}"),
        Step("sd3plugin-cache pack -o sd3-cache.tar.zst", "SD3PLUGIN_CACHE_DIR=$CI sd3plugin-cache pack -o sd3-cache.tar.zst",
             ("sd3-cache.tar.zst", "sd3-cache.tar.zst.sha256")),
        Step("sd3plugin-cache install sd3-cache.tar.zst",
             "SD3PLUGIN_CACHE_DIR=$SERVER sd3plugin-cache install sd3-cache.tar.zst"),
        Step("sd3plugin-cache verify model=/models/sd3", "SD3PLUGIN_CACHE_DIR=$SERVER sd3plugin-cache verify model=$MODEL"),
    )),
    "docs/cache.md": ("elsewhere", (
        Step("", "sd3plugin-cache keygen -o ci.key", ("ci.key", "ci.key.pub")),
        Step("sd3plugin-cache warm model=sd3-medium --resolutions 1024x1024,768x1344 --batch-sizes 1",
             f"SD3PLUGIN_CACHE_DIR=$CI {WARM_TINY} --batch-sizes 1"),
        Step("sd3plugin-cache pack -o sd3-cache.tar.zst --sign ci.key",
             "SD3PLUGIN_CACHE_DIR=$CI sd3plugin-cache pack -o sd3-cache.tar.zst --sign ci.key",
             ("sd3-cache.tar.zst", "sd3-cache.tar.zst.sha256", "sd3-cache.tar.zst.sig")),
        Step("sd3plugin-cache install sd3-cache.tar.zst --trust ci.key.pub",
             "SD3PLUGIN_CACHE_DIR=$SERVER sd3plugin-cache install sd3-cache.tar.zst --trust ci.key.pub"),
        Step("sd3plugin-cache verify model=/models/sd3-medium",
             "SD3PLUGIN_CACHE_DIR=$SERVER sd3plugin-cache verify model=$MODEL"),
    )),
}
CHAINED = {step.doc: name for name, (_, steps) in CHAINS.items() for step in steps
           if step.doc and step.doc not in REFUSES}

SKIPPED: dict[str, str] = {  # a stable substring of the command -> why the test does not run it
    "pip install": "installs packages (the environment under test is already installed)",
    "python -m pytest": "the test suite itself (.ci/run runs it)",
    "scripts/attn_bench.py": "GPU benchmark of the attention kernels",
    "scripts/gpu_bench.sh": "GPU benchmarks (the device machine)",
    "scripts/parallel_bench.sh": "GPU benchmark on two GPUs (the nvidia-h200-x2 device machine)",
    "scripts/step_profile.py": "GPU profile of one step (the device machine)",
    "scripts/step_cache_bench.py": "GPU benchmark of the step-cache presets (the device machine)",
    "scripts/nexfort-env.sh": "builds the torch 2.4 nexfort environment (about 3 GB of downloads; "
                              "scripts/ci-nexfort.sh in .ci/run builds and tests it)",
    ". .venv-nexfort/bin/activate": "activates the nexfort environment of the line before",
    "docker run": "needs docker and a GPU runner; its warm and pack are the ones of docs/cache.md's chain",
}


def classify(command: Command) -> tuple[str, object]:
    """(class, entry) of a docs command; AssertionError when it is in no table or in several."""
    text = command.text
    found = [(cls, table[text]) for cls, table in (("runs", RUNS), ("refuses", REFUSES), ("chained", CHAINED))
             if text in table]
    found += [("skipped", reason) for key, reason in SKIPPED.items() if key in text]
    assert found, (f"{command}\n  is not classified: add it to RUNS, REFUSES, CHAINS or SKIPPED in "
                   f"tests/test_docs_commands.py")
    assert len(found) == 1, f"{command}\n  is in several tables: {[cls for cls, _ in found]}"
    return found[0]


# -- fast lane: extraction and classification only ---------------------------------------------------------------
def test_every_fenced_block_names_a_known_language():
    bad = [f"{b.doc}:{b.line}: ```{b.lang}" for b in all_blocks() if b.lang not in LANGUAGES]
    assert not bad, f"fenced blocks need one of {sorted(LANGUAGES)} (text for diagrams and output):\n" + "\n".join(bad)


def test_every_docs_command_is_classified():
    found = docs_commands()
    assert len(found) >= 30, [str(c) for c in found]
    classes, problems = [], []
    for command in found:
        try:
            classes.append(classify(command)[0])
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)
    assert {"runs", "refuses", "chained", "skipped"} <= set(classes)


def test_no_table_entry_is_stale():
    """Every RUNS / REFUSES / CHAINS / SKIPPED entry still names a docs command."""
    texts = {c.text for c in docs_commands()}
    stale = [t for t in [*RUNS, *REFUSES, *(s.doc for _, steps in CHAINS.values() for s in steps if s.doc)]
             if t not in texts]
    stale += [key for key in SKIPPED if not any(key in t for t in texts)]
    assert not stale, "entries naming no docs command (the docs changed?):\n" + "\n".join(stale)


def test_chains_cover_their_docs_block_in_order():
    for doc, (_, steps) in CHAINS.items():
        order = [c.text for c in docs_commands() if c.doc == doc]
        named = [s.doc for s in steps if s.doc]
        assert [t for t in order if t in named] == named, doc


def test_extraction_joins_lines_strips_comments_and_can_fail():
    block = Block("x.md", 1, "bash", "\n".join([
        "a --flag 'x # not a comment' && b   # a comment",
        "c \"multi",
        "line\" \\",
        "   --more",
        "# only a comment",
    ]))
    assert [c.text for c in commands(block)] == ["a --flag 'x # not a comment'", "b",
                                                 'c "multi\nline" --more']
    console = Block("x.md", 1, "console", "$ sd3plugin-cache ls\n/tmp/cache: 0 entries")
    assert [c.text for c in commands(console)] == ["sd3plugin-cache ls"]
    with pytest.raises(AssertionError, match="is not classified"):
        classify(Command("x.md", 1, "sd3plugin-run model=something-new"))
    with pytest.raises(AssertionError, match="several tables"):
        classify(Command("x.md", 1, "pip install x && python -m pytest"))


_NAME = re.compile(r"\bsd3plugin(?:\.\w+)+")


def _exists(name: str) -> bool:
    """Whether ``a.b.c`` is a module (found, not imported: ``sd3plugin.auto`` would enable the hook) or an
    attribute of the longest module prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ImportError:
            continue
        if cut == len(parts):
            return True
        obj = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_python_blocks_compile_and_name_existing_api():
    """Compiled, not run: each needs a GPU, a Hub model or a pipeline it does not build."""
    python = [b for b in all_blocks() if b.lang == "python"]
    assert python
    missing = []
    for b in python:
        tree = ast.parse(b.text, f"{b.doc}:{b.line}")
        compile(tree, f"{b.doc}:{b.line}", "exec")
        missing += [f"{b.doc}:{b.line + node.lineno}: torch_dtype= (diffusers 0.42 takes dtype=, as README.md says)"
                    for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "torch_dtype"]
        missing += [f"{b.doc}:{b.line}: {name} does not exist" for name in sorted(set(_NAME.findall(b.text)))
                    if not _exists(name)]
    assert not missing, missing


# -- slow lane: run them -----------------------------------------------------------------------------------------
def _unique(table) -> list[str]:
    texts = {c.text for c in docs_commands()}
    return [t for t in table if t in texts]


def _fresh_clone(dest: Path) -> Path:
    """What a user has: a clone of this checkout (with its uncommitted changes, so a developer tests what they see)."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest)], check=True)
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn"], input=diff, check=True)
    untracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--others", "--exclude-standard", "-z"],
                               capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, untracked):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel, follow_symlinks=False)
    return dest


@dataclass
class Place:
    clone: Path
    elsewhere: Path
    env: dict = field(default_factory=dict)

    def cwd(self, where: str) -> Path:
        return self.clone if where == "clone" else self.elsewhere


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "sd3plugin-run").exists(), f"the tools are not installed in {bin_dir}"
    tmp = tmp_path_factory.mktemp("docs-commands")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SD3PLUGIN_", "HF_", "TORCHINDUCTOR_", "TRITON_", "XDG_", "PYTHON"))}
    env.update(HOME=str(tmp / "home"), SD3PLUGIN_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1",
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    (tmp / "home").mkdir()
    (tmp / "elsewhere").mkdir()
    return Place(_fresh_clone(tmp / "clone"), tmp / "elsewhere", env)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if ".git" not in p.relative_to(folder).parts}


def _run(place: Place, where: str, text: str, env: dict | None = None):
    """Run ``text`` with bash in the given place; (result, files it created). Nothing may appear in ROOT."""
    cwd = place.cwd(where)
    before, root_before = _files(cwd), {p.name for p in ROOT.iterdir()}
    res = subprocess.run(["bash", "-c", text], cwd=cwd, env=env or place.env, capture_output=True, text=True,
                         timeout=900, stdin=subprocess.DEVNULL)
    assert {p.name for p in ROOT.iterdir()} == root_before, f"{text!r} wrote into the checkout {ROOT}"
    return res, _files(cwd) - before


def _new(created: set[Path], cwd: Path, pattern: str) -> list[Path]:
    """The created files whose path below ``cwd`` matches ``pattern`` (a glob of as many parts)."""
    return [p for p in created if p.is_file() and len(p.relative_to(cwd).parts) == len(Path(pattern).parts)
            and p.relative_to(cwd).match(pattern)]


def _show(res) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"


def _params(table):
    return [pytest.param(where, text, id=f"{where}: {text}") for where in ("clone", "elsewhere")
            for text in _unique(table)]


@pytest.mark.slow
@pytest.mark.parametrize("where,text", _params(RUNS))
def test_runs_as_written(place, where, text):
    expect = RUNS[text]
    res, created = _run(place, where, text)
    assert res.returncode == 0, _show(res)
    assert "Traceback" not in res.stderr + res.stdout, _show(res)
    for says in expect.says:
        assert says in res.stdout, f"{says!r} not in the output\n{_show(res)}"
    cwd = place.cwd(where)
    for pattern in expect.files:
        assert _new(created, cwd, pattern), f"{pattern} was not written in {cwd}\n{_show(res)}"
    # the summary names the folder it wrote: inside the working folder, with both reports
    for folder in map(Path, re.findall(rf"^{RUN_SUMMARY} .* to (\S+)$", res.stdout, re.M)):
        assert folder.resolve().is_relative_to(cwd.resolve()), folder
        assert (folder / "report.md").is_file() and (folder / "report.json").is_file(), folder


def _memory_is_short(preset: str, dtype: str, margin_gib: float = 0.5) -> bool:
    """Whether building ``preset`` on this CPU needs clearly more host memory than is free."""
    import torch

    from sd3plugin.memory_check import GiB, available_ram_bytes, host_needs

    free = available_ram_bytes()
    need = max(n for _, n in host_needs(preset, getattr(torch, dtype).itemsize, "cpu", True))
    return free is not None and need > free + margin_gib * GiB


@pytest.mark.slow
@pytest.mark.parametrize("where,text", _params(REFUSES))
def test_refuses_clearly(place, where, text):
    expect = REFUSES[text]
    if expect.memory and not _memory_is_short(*expect.memory):
        pytest.skip(f"{expect.memory[0]} fits this machine's memory: it would build and run (not a test)")
    res, created = _run(place, where, text)
    try:
        assert res.returncode == expect.code, _show(res)
        assert "Traceback" not in res.stderr + res.stdout, _show(res)
        lines = [line for line in res.stderr.splitlines() if expect.says in line]
        assert len(lines) == 1, f"expected one stderr line with {expect.says!r}\n{_show(res)}"
        assert not [p for p in created if p.suffix in (".png", ".zst") or p.name == "report.json"], created
    except AssertionError:
        if expect.known_bug:
            pytest.xfail(expect.known_bug)
        raise
    assert not expect.known_bug, f"fixed: remove known_bug from REFUSES[{text!r}]"


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain(place, tmp_path, chain):
    where, steps = CHAINS[chain]
    cwd = place.cwd(where)
    folders = {"CI": tmp_path / "ci-cache", "SERVER": tmp_path / "server-cache"}
    env = dict(place.env, **{k: str(v) for k, v in folders.items()})
    for step in steps:
        if "$MODEL" in step.run:
            models = [p for p in glob.glob(str(folders["CI"] / "models" / "tiny-*")) if os.path.isdir(p)]
            assert len(models) == 1, models
            env["MODEL"] = models[0]
        res, created = _run(place, where, step.run, env)
        assert res.returncode == 0, f"{step.run}\n(docs: {step.doc})\n{_show(res)}"
        assert "Traceback" not in res.stderr, _show(res)
        for pattern in step.files:
            assert _new(created, cwd, pattern), f"{pattern} was not written in {cwd} by {step.run}\n{_show(res)}"
    assert (folders["SERVER"] / "installed.json").is_file()
    assert res.stdout.startswith("OK:") and "fresh compilations 0," in res.stdout, _show(res)  # verify's line
