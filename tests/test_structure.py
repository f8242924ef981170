"""Layers only import downward (docs/architecture.md): a module may import its own layer or a lower one, at
module level or inside a function. A new upward import fails here with the file and the name."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sd3plugin"

# Lower number = lower layer. Keys are module paths relative to the package (a folder covers its modules).
LAYERS = {
    "errors": 0, "compat": 0, "global_settings": 0, "environment": 0, "progress": 0, "startup": 0, "regular_file": 0,
    "config": 1, "models": 1, "memory_check": 1, "model_source": 1,
    "plan": 2, "cache": 2,
    "kernels": 3, "backends": 3, "quant": 3,
    "transforms": 4,
    "optimize": 5, "hook": 5, "auto": 5, "pipeline": 5, "preflight": 5, "__init__": 5,
    "apps": 6, "cli": 6, "__main__": 6,
}


def layer_of(parts: tuple[str, ...]) -> int | None:
    return LAYERS.get(parts[0]) if parts else None


def imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """(module parts relative to the package, line) of every sd3plugin import in ``path``."""
    rel = path.relative_to(PKG).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                mod = (*base, *(node.module.split(".") if node.module else ()))
                targets = [mod] if node.module else [(*mod, a.name) for a in node.names]
            elif node.module and node.module.split(".")[0] == "sd3plugin":
                targets = [tuple(node.module.split(".")[1:])]
            else:
                continue
            out += [(t, node.lineno) for t in targets]
        elif isinstance(node, ast.Import):
            out += [(tuple(a.name.split(".")[1:]), node.lineno) for a in node.names
                    if a.name.split(".")[0] == "sd3plugin"]
    return out


def test_imports_point_down():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if "conf" in path.relative_to(PKG).parts:
            continue
        rel = path.relative_to(PKG).with_suffix("").parts
        own = layer_of(rel)
        assert own is not None, f"{path}: no layer for {rel[0]} in LAYERS (add it, and to docs/architecture.md)"
        for target, line in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports sd3plugin.{'.'.join(target)}")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: a config module importing the optimizer is reported."""
    fake = tmp_path / "sd3plugin"
    (fake / "config").mkdir(parents=True)
    (fake / "config" / "bad.py").write_text("from ..optimize import optimize\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PKG"]), "PKG", fake)
    assert imports(fake / "config" / "bad.py") == [(("optimize",), 1)]
    assert layer_of(("optimize",)) > layer_of(("config", "bad"))
