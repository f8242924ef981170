"""What ``sd3plugin-run`` leaves behind: the images (``image_path`` or ``output_dir/image_NN.png``),
``report.md`` (the human view), ``report.json`` (everything: config, optimization report, versions) and
the short summary it prints last."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def image_paths(count: int, image_path, out: Path) -> list[Path]:
    """Where the images go: ``image_path`` exactly for the first one and ``stem_1.png``, ``stem_2.png``... beside
    it for the others; without ``image_path``, ``out/image_00.png``, ``out/image_01.png``..."""
    if not image_path:
        return [out / f"image_{i:02d}.png" for i in range(count)]
    first = Path(str(image_path)).expanduser()
    return [first] + [first.with_name(f"{first.stem}_{i}{first.suffix}") for i in range(1, count)]


def save_images(images, paths: list[Path]) -> list[str]:
    """Each image written whole or not at all (a file beside it, then renamed): an interrupted run never
    leaves a truncated image, nor a truncated version of a file that was at that path."""
    from PIL import Image

    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = path.suffix.lower()
        fmt = Image.registered_extensions().get(ext, "PNG")  # a name without a known extension: PNG
        _replace_with(path, lambda fh: image.save(fh, format=fmt))
    return [str(p.resolve()) for p in paths]


def _replace_with(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a written file is as any other
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or what it held before."""
    _replace_with(path, lambda fh: fh.write(text.encode()))


def versions() -> dict:
    import platform

    import diffusers
    import torch

    import sd3plugin

    info = {"sd3plugin": sd3plugin.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _backend(opt: dict) -> str:
    """The backend and why it was chosen."""
    reason = opt.get("backend_reason")
    return f"{opt.get('backend')} ({reason})" if reason else str(opt.get("backend"))


def _link(path: str, out: Path) -> str:
    """A Markdown link to an image, relative to report.md's folder when it lies below it, else absolute."""
    absolute = Path(path).resolve()
    rel = os.path.relpath(absolute, out.resolve())
    target = str(absolute) if rel.startswith("..") else rel
    return f"[{Path(path).name}]({target})"


def report_markdown(result: dict, out: Path | None = None) -> str:
    opt = result["optimization"]
    rows = [
        ("backend", _backend(opt)),
        ("mode", f"`{opt.get('mode', {}).get('spec')}`"),
        ("status", opt.get("status")),
        ("resolution / steps", f"{result['width']}x{result['height']}, {result['steps']} steps"),
        ("load", f"{result['load_seconds']:.2f} s"),
        ("warm-up incl. compile", f"{result['warmup_seconds']:.2f} s"),
        ("iteration speed", f"{result['iterations_per_second']:.2f} it/s"),
        ("end-to-end", f"{result['e2e_seconds']:.2f} s"),
        ("peak memory", f"{result['peak_memory_gib']:.3f} GiB ({'GPU' if result['device'] == 'cuda' else 'CPU RSS'})"),
        ("device", result["versions"].get("gpu") or result["device"]),
    ]
    images = ", ".join(_link(p, out) if out is not None else p for p in result["images"])
    lines = [f"# sd3plugin-run: {result['config'].get('model', '')}", "", f"Images: {images}", "",
             "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "Everything else (the composed config, the optimization report, versions): report.json."]
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out: Path) -> None:
    result = {"complete": True, **result}
    write_atomic(out / "report.json", json.dumps(result, indent=2, default=str))
    write_atomic(out / "report.md", report_markdown(result, out))


def summary(result: dict, out: Path) -> str:
    """The few lines sd3plugin-run ends with: where things went, speed, compile time, backend and why."""
    opt = result["optimization"]
    images = result["images"]
    lines = [f"sd3plugin-run: wrote {len(images)} image{'s' if len(images) != 1 else ''}, report.md and "
             f"report.json to {out.resolve()}"]
    lines += [f"  image: {p}" for p in images]
    lines += [f"  {result['iterations_per_second']:.2f} it/s, end-to-end {result['e2e_seconds']:.2f} s "
              f"({result['steps']} steps, {result['width']}x{result['height']}); warm-up incl. compile "
              f"{result['warmup_seconds']:.2f} s; load {result['load_seconds']:.2f} s",
              f"  backend: {_backend(opt)}; status: {opt.get('status')}"]
    return "\n".join(lines)
