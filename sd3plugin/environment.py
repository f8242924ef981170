"""What this machine can run: versions, GPU, usable backends, and nexfort's install layout.

Used by ``sd3plugin-cache doctor`` and by the nexfort backend's availability check. Nothing here imports
the nexfort modules that end the process without a licence (see ``LICENSED_NEXFORT_MODULES``).
"""
from __future__ import annotations

import filecmp
import functools
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# nexfort 0.1.dev330 refuses to import on anything but this stack (REFERENCE.md section 3).
NEXFORT_VERSION = "0.1.dev330"
NEXFORT_TORCH = "2.4.0"
NEXFORT_TRITON = "3.0.0"
LICENCE_ENV = "SILICON_ONEDIFF_LICENSE_KEY"
DISABLE_ENV = "SD3PLUGIN_DISABLE_NEXFORT"  # =1: treat nexfort as not usable (backend=auto picks inductor)
# Importing these without a licence key starts a thread that ends the process (exit code 255).
LICENSED_NEXFORT_MODULES = ("nexfort.nn.modules", "nexfort.nn.attention_processor",
                            "nexfort.compilers.register_diffusers")
# The 0.1.dev330 wheel puts these at the top of site-packages instead of nexfort/inductor/codegen/
# (onediff#1189); the first compiled call then fails with "No module named 'nexfort.inductor.codegen'".
NEXFORT_CODEGEN_PACKAGE = ("nexfort", "inductor", "codegen")
NEXFORT_CODEGEN_MODULES = ("triton", "triton_helpers", "nexfort_codegen_extension")
FIX_HINT = "run `sd3plugin-cache doctor --fix`"
INSTALL_HINT = "scripts/nexfort-env.sh builds the torch 2.4 stack it needs"


class LayoutFixError(PermissionError):
    """nexfort's layout cannot be repaired here (read-only site-packages, not the owner...)."""


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it; None if not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def base_version(version: str | None) -> str | None:
    """'2.4.0+cu121' -> '2.4.0'."""
    return version.split("+")[0] if version else None


def versions() -> dict:
    """Versions of everything that decides what can run (None: not installed)."""
    import torch

    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # CPU builds without cuDNN
        cudnn = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": cudnn}
    for name in ("triton", "diffusers", "transformers", "huggingface-hub", "onediff", "onediffx", "nexfort",
                 "torchao", "flash-attn-4", "nvidia-cutlass-dsl", "sd3plugin"):
        info[name] = dist_version(name)
    return info


def gpu_info() -> dict:
    """The first visible CUDA GPU, its compute capability and whether it runs fp8 (sm >= 8.9)."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "count": 0, "name": None, "capability": None, "fp8": False}
    major, minor = torch.cuda.get_device_capability(0)
    return {"available": True, "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0),
            "capability": f"{major}.{minor}", "fp8": (major, minor) >= (8, 9)}


# -- nexfort's misplaced extension modules ------------------------------------------------------------
# nexfort needs each codegen module in two places: nexfort/inductor/codegen/ (its inductor codegen) and
# the top of site-packages (`import nexfort_codegen_extension` in nexfort/kernels/). The wheel installs
# only the second, so the fix copies; it also restores a top-level copy that someone moved away.

@dataclass(frozen=True)
class MisplacedModule:
    source: Path   # the copy that exists
    target: Path   # where nexfort also imports it from, missing or different


def nexfort_distribution(paths: list[str] | None = None):
    """The installed nexfort distribution (searched in ``paths``, default sys.path), or None."""
    for dist in metadata.distributions(name="nexfort", path=paths if paths is not None else sys.path):
        return dist
    return None


def _is_codegen_module(filename: str) -> bool:
    return filename.split(".")[0] in NEXFORT_CODEGEN_MODULES and filename.endswith((".so", ".pyd"))


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


def misplaced_nexfort_modules(dist=None) -> list[MisplacedModule]:
    """nexfort's codegen extension modules missing from one of the two places it imports them from."""
    dist = dist if dist is not None else nexfort_distribution()
    if dist is None:
        return []
    site = Path(dist.locate_file(""))
    codegen = site.joinpath(*NEXFORT_CODEGEN_PACKAGE)
    names = sorted({rel.name for rel in dist.files or [] if _is_codegen_module(rel.name)
                    and (len(rel.parts) == 1 or tuple(rel.parts[:-1]) == NEXFORT_CODEGEN_PACKAGE)})
    found = []
    for name in names:
        top, inner = site / name, codegen / name
        if top.is_file() and not _same_file(top, inner):
            found.append(MisplacedModule(top, inner))
        elif inner.is_file() and not top.is_file():
            found.append(MisplacedModule(inner, top))
    return found


def _writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (tried for real: permissions, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(dir=path, prefix=".sd3plugin-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _nearest_existing(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _add_to_record(dist, copied: list[MisplacedModule], init_rel: str | None) -> None:
    """List the copies in nexfort's RECORD (same hash and size), so `pip uninstall` removes them too."""
    records = [f for f in dist.files or [] if f.name == "RECORD" and f.parent.name.endswith(".dist-info")]
    if not records:
        return
    record = Path(dist.locate_file(records[0]))
    site = Path(dist.locate_file(""))
    lines = record.read_text().splitlines()
    by_path = {ln.partition(",")[0]: ln.partition(",")[2] for ln in lines}
    for m in copied:
        src, dst = m.source.relative_to(site).as_posix(), m.target.relative_to(site).as_posix()
        if dst not in by_path:
            lines.append(f"{dst},{by_path.get(src, ',')}")
    if init_rel and init_rel not in by_path:
        lines.append(f"{init_rel},,")
    tmp = record.with_name(record.name + ".sd3plugin-tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, record)


def fix_nexfort_layout(dist=None) -> list[str]:
    """Copy nexfort's codegen extension modules to where they are missing (idempotent).

    Returns one line per action taken (empty: nothing to do). Raises LayoutFixError, before changing
    anything, when a folder it must write to is not writable.
    """
    dist = dist if dist is not None else nexfort_distribution()
    misplaced = misplaced_nexfort_modules(dist)
    if not misplaced:
        return []
    site = Path(dist.locate_file(""))
    codegen = site.joinpath(*NEXFORT_CODEGEN_PACKAGE)
    folders = {_nearest_existing(m.target.parent) for m in misplaced} | {site}
    for folder in sorted(folders):
        if not _writable(folder):
            raise LayoutFixError(
                f"cannot repair nexfort's layout: {folder} is not writable by this user; run "
                f"`sd3plugin-cache doctor --fix` as the owner of that Python environment (or with sudo), "
                f"or copy {', '.join(m.source.name for m in misplaced)} to {codegen}/ yourself")
    actions = []
    codegen.mkdir(parents=True, exist_ok=True)
    init = codegen / "__init__.py"
    init_rel = None
    if not init.exists():
        init.write_text("# created by sd3plugin-cache doctor --fix (nexfort wheel layout, onediff#1189)\n")
        init_rel = init.relative_to(site).as_posix()
        actions.append(f"created {init}")
    for m in misplaced:
        tmp = m.target.with_name(m.target.name + ".sd3plugin-tmp")
        shutil.copy2(m.source, tmp)
        os.replace(tmp, m.target)  # never a half-written extension module
        actions.append(f"copied {m.source} -> {m.target}")
    _add_to_record(dist, misplaced, init_rel)
    return actions


# -- the GPU-only scripts -------------------------------------------------------------------------------

def cuda_missing(what: str) -> str | None:
    """None where torch sees a CUDA GPU; else one line for a GPU-only tool (``what``): why not, and the fix."""
    import torch

    if torch.cuda.is_available():
        return None
    why = ("this torch is built without CUDA" if torch.version.cuda is None
           else "torch sees no CUDA GPU (none present, or CUDA_VISIBLE_DEVICES hides it)")
    return (f"{what} measures on a CUDA GPU and {why}: torch {torch.__version__}; run it on the GPU machine "
            "(scripts/gpu_bench.sh lists the runs)")


def exit_without_cuda(what: str) -> None:
    """For the scripts in scripts/: end with one line on stderr and exit code 2 when there is no CUDA GPU."""
    missing = cuda_missing(what)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        raise SystemExit(2)


# -- whether the nexfort backend can run ---------------------------------------------------------------

def licensed_modules_loaded() -> list[str]:
    return [m for m in LICENSED_NEXFORT_MODULES if m in sys.modules]


def nexfort_static_check() -> tuple[bool, str]:
    """Versions and layout, without importing nexfort: (ok, reason)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False, f"nexfort is switched off by {DISABLE_ENV}=1"
    nexfort = dist_version("nexfort")
    if nexfort is None:
        return False, f"nexfort is not installed ({INSTALL_HINT})"
    import torch

    torch_v = base_version(torch.__version__)
    if torch_v != NEXFORT_TORCH:
        return False, (f"nexfort {nexfort} needs torch {NEXFORT_TORCH} exactly, this is torch {torch.__version__} "
                       f"({INSTALL_HINT})")
    triton_v = base_version(dist_version("triton"))
    if triton_v != NEXFORT_TRITON:
        return False, f"nexfort {nexfort} needs triton {NEXFORT_TRITON}, this has triton {triton_v} ({INSTALL_HINT})"
    for name in ("onediff",):
        if importlib.util.find_spec(name) is None:
            return False, f"nexfort is installed but {name} is not (pip install '.[nexfort]')"
    misplaced = misplaced_nexfort_modules()
    if misplaced:
        return False, (f"nexfort's extension modules {', '.join(m.source.name.split('.')[0] for m in misplaced)} "
                       f"are missing from {misplaced[0].target.parent} (onediff#1189); {FIX_HINT}")
    return True, f"nexfort {nexfort}, torch {torch.__version__}, triton {triton_v}"


@functools.lru_cache(maxsize=1)
def nexfort_status() -> tuple[bool, str]:
    """(usable, reason) for the nexfort backend: versions, layout, then the real imports (cached)."""
    ok, reason = nexfort_static_check()
    if not ok:
        return ok, reason
    try:
        importlib.import_module("nexfort")
        importlib.import_module("nexfort.dynamo")  # registers the torch.compile backend "nexfort"
        importlib.import_module("nexfort.compilers")
        importlib.import_module("onediff.infer_compiler")
    except Exception as exc:  # nexfort raises RuntimeError/ImportError on a mismatched build
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return False, f"nexfort does not import: {type(exc).__name__}: {first} ({INSTALL_HINT})"
    loaded = licensed_modules_loaded()
    if loaded and not os.environ.get(LICENCE_ENV):
        return False, f"importing nexfort loaded licensed modules {loaded} without {LICENCE_ENV}"
    return True, f"{reason}, onediff {dist_version('onediff')}"


def codegen_target() -> str | None:
    dist = nexfort_distribution()
    return str(Path(dist.locate_file("")).joinpath(*NEXFORT_CODEGEN_PACKAGE)) if dist is not None else None
