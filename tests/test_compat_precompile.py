"""The precompile seam (sd3plugin/compat/precompile.py) against the installed torch.

Supported: torch >= 2.10 (``torch._dynamo.aot_compile``). Older torch (the nexfort stack's 2.4) is
documented as unsupported: sd3plugin compiles as before there, and these tests skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sd3plugin.compat import precompile as pc

TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
SUPPORTED = TORCH >= (2, 10)
needs_precompile = pytest.mark.skipif(not SUPPORTED, reason=f"torch {torch.__version__} < 2.10 has no precompile "
                                                            "(documented as unsupported: docs/cache.md)")


@needs_precompile
def test_installed_torch_has_everything_the_seam_uses():
    assert pc.check() == []
    ok, why = pc.support()
    assert ok, why
    assert pc.api() in (pc.PUBLIC, pc.PRIVATE)


@pytest.mark.skipif(SUPPORTED, reason="this torch supports precompile")
def test_an_unsupported_torch_says_why():
    ok, why = pc.support()
    assert not ok and "precompile" in why


class ToyBlock(torch.nn.Module):
    """What a transformer block does with sd3plugin's kernels: the joint-attention op and the GELU epilogue op
    (both run their CPU paths here)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.cqkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.cout = torch.nn.Linear(dim, dim)
        self.ff = torch.nn.Linear(dim, 4 * dim)

    def forward(self, x, c):
        img, ctx = torch.ops.sd3plugin.joint_attention(
            x, c, self.qkv.weight, self.qkv.bias, self.cqkv.weight, self.cqkv.bias, self.out.weight, self.out.bias,
            self.cout.weight, self.cout.bias, self.heads)
        return torch.ops.sd3plugin.linear_gelu_tanh(img, self.ff.weight, self.ff.bias), ctx


CHILD = textwrap.dedent('''
    import json, sys, torch
    from torch._dynamo.utils import counters
    import sd3plugin.kernels.attention, sd3plugin.kernels.gelu_epilogue  # registers sd3plugin's ops
    from sd3plugin.compat import precompile as pc
    sys.path.insert(0, sys.argv[3])
    from tests.test_compat_precompile import ToyBlock
    saved = torch.load(sys.argv[2])
    block = ToyBlock()
    block.load_state_dict(saved["state"])
    art = pc.deserialize(open(sys.argv[1], "rb").read())
    with torch.no_grad():
        ok = pc.guard_check(art, (block, saved["x"], saved["c"]), {})
        out = pc.call(art, (block, saved["x"], saved["c"]), {})
        other = pc.guard_check(art, (block, saved["x"][:, :3], saved["c"]), {})
    err = max((a - b).abs().max().item() for a, b in zip(out, saved["expected"]))
    print(json.dumps({"guards": ok, "other_shape": other, "err": err, "why": pc.guard_failure(art, (block, saved["x"], saved["c"]), {}),
                      "graphs": int(counters["stats"]["unique_graphs"]), "sources": pc.source_changes(art)}))
''')


@needs_precompile
@pytest.mark.slow  # two fresh processes that compile: in the slow lane of .ci/run
@pytest.mark.parametrize("way", [pc.PUBLIC, pc.PRIVATE])
def test_sd3plugin_ops_run_inside_a_function_precompiled_here_and_loaded_in_a_fresh_process(tmp_path, way):
    if way == pc.PUBLIC and pc.api() != pc.PUBLIC:
        pytest.skip(f"torch {torch.__version__} has no {pc.PUBLIC}")
    import sd3plugin.kernels.attention  # noqa: F401  (registers the ops)
    import sd3plugin.kernels.gelu_epilogue  # noqa: F401

    torch.manual_seed(0)
    block = ToyBlock().eval()
    x, c = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = block(x, c)
        art = pc.compile_function(type(block).forward, (block, x, c), {}, {}, dynamic=False, prefer=way)
    (tmp_path / "block.pt2").write_bytes(pc.serialize(art))
    torch.save({"state": block.state_dict(), "x": x, "c": c, "expected": expected}, tmp_path / "io.pt")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-elsewhere"))  # nothing cached there
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "block.pt2"), str(tmp_path / "io.pt"),
                           os.path.dirname(os.path.dirname(os.path.abspath(__file__)))], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["guards"] is True and result["other_shape"] is False, result["why"]
    assert result["graphs"] == 0  # nothing traced or compiled by Dynamo in the fresh process
    assert result["err"] < 1e-5 and result["sources"] == []


def test_guard_filter_drops_what_cannot_be_serialized_and_globals():
    from types import SimpleNamespace as E

    entries = [E(is_global=False, guard_type="TENSOR_MATCH", derived_guard_types=()),
               E(is_global=True, guard_type="TENSOR_MATCH", derived_guard_types=()),
               E(is_global=False, guard_type="ID_MATCH", derived_guard_types=("ID_MATCH",)),
               E(is_global=False, guard_type="CONSTANT_MATCH", derived_guard_types=("ID_MATCH",)),
               E(is_global=False, guard_type="EQUALS_MATCH", derived_guard_types=("EQUALS_MATCH",))]
    assert pc.guard_filter(entries) == [True, False, False, False, True]


@needs_precompile
def test_the_source_checksum_is_the_one_dynamo_records():
    import diffusers.models.attention as module
    from torch._dynamo.package import _hash_sourcelines

    assert pc.source_checksum(module, 10, 40) == _hash_sourcelines(module, 10, 40)
