"""The cache CLI with the nexfort backend (nexfort environment only: scripts/nexfort-env.sh).

nexfort's compiled-graph cache lives in ``cache_dir/inductor/compiledgraph`` and torch 2.4 has no
Mega-Cache, so the inductor folder alone carries the cache: warm, pack, install elsewhere, verify must
compile nothing (no new compiled-graph entry) and make the first image faster than the cold warm.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from sd3plugin import environment
from sd3plugin.cache.archive import read_manifest
from sd3plugin.cli.cache import main

NEXFORT_OK, NEXFORT_WHY = environment.nexfort_status() if environment.dist_version("nexfort") else (False, "")
pytestmark = [pytest.mark.nexfort, pytest.mark.slow,
              pytest.mark.skipif(not NEXFORT_OK, reason=f"nexfort not usable here: {NEXFORT_WHY or 'not installed'}")]
OVERRIDES = ["backend=nexfort", "steps=2"]


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    return code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()


def test_nexfort_cache_ships_and_starts_warm(tmp_path, monkeypatch):
    monkeypatch.delenv(environment.LICENCE_ENV, raising=False)
    warm_dir, serve_dir, archive = tmp_path / "warm", tmp_path / "serve", tmp_path / "nexfort.tar.zst"
    code, warmed, err = _cli("warm", "--cache-dir", str(warm_dir), "--resolutions", "64x64", *OVERRIDES)
    assert code == 0, err[-3000:]
    assert warmed["backend"] == "nexfort" and warmed["blob"] is None  # no Mega-Cache on torch 2.4
    assert warmed["shapes"][0]["fresh_compilations"] > 0
    assert list((warm_dir / "inductor" / "compiledgraph").glob("*/entry"))
    code, packed, err = _cli("pack", "--cache-dir", str(warm_dir), "-o", str(archive))
    assert code == 0, err
    assert any(f.startswith("inductor/compiledgraph/") for f in read_manifest(archive)["files"])
    code, installed, err = _cli("install", str(archive), "--cache-dir", str(serve_dir))
    assert code == 0, err
    model = warm_dir / "models" / "tiny-float32"
    code, verified, err = _cli("verify", "--cache-dir", str(serve_dir), f"model={model}", *OVERRIDES)
    assert code == 0, err[-3000:]
    assert verified["backend"] == "nexfort" and verified["nexfort_graph_cache_new"] == 0
    assert verified["fresh_compilations"] == 0
    assert verified["first_image_seconds"] < warmed["shapes"][0]["seconds"]
