"""Where sd3plugin-run's files go: --saved-image writes exactly the named file, and the closing summary
names the output folder and every image."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sd3plugin.apps.run_report import image_paths


def test_image_paths_named_or_numbered(tmp_path):
    assert image_paths(3, "pics/sd3.png", tmp_path) == [Path("pics/sd3.png"), Path("pics/sd3_1.png"),
                                                       Path("pics/sd3_2.png")]
    assert image_paths(1, "out.jpg", tmp_path) == [Path("out.jpg")]
    assert image_paths(2, None, tmp_path) == [tmp_path / "image_00.png", tmp_path / "image_01.png"]


def test_saved_image_writes_the_named_file_and_the_summary_names_the_folder(tmp_path, cache_dir):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "sd3plugin", "backend=eager", "steps=1", "num_images=2",
                          f"output_dir={out}", "--saved-image", "pics/sd3.png"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = tmp_path / "pics" / "sd3.png", tmp_path / "pics" / "sd3_1.png"
    for path in (first, second):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert not list(out.glob("image_*.png")) and not list((tmp_path / "pics").glob("image_*"))

    summary = res.stdout[res.stdout.index("sd3plugin-run: wrote"):]
    assert f"wrote 2 images, report.md and report.json to {out.resolve()}" in summary
    assert f"image: {first.resolve()}" in summary and f"image: {second.resolve()}" in summary
    assert "it/s" in summary and "warm-up incl. compile" in summary and "backend: eager" in summary

    report = json.loads((out / "report.json").read_text())
    assert report["images"] == [str(first.resolve()), str(second.resolve())]
    assert report["output_dir"] == str(out.resolve()) and report["config"]["image_path"] == "pics/sd3.png"
    md = (out / "report.md").read_text()
    assert f"[sd3.png]({first.resolve()})" in md and "| iteration speed |" in md and "report.json" in md
