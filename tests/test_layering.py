"""The package's layers import only downwards (no cycles), checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sparsekit"

# module (relative to sparsekit/) -> sparsekit modules it must never import, at any depth of
# the file (lazy imports inside functions included)
FORBIDDEN = {
    "formats.py": ("sparsekit.ops", "sparsekit.functional", "sparsekit.nn", "sparsekit.bench"),
    "timing.py": ("sparsekit.ops", "sparsekit.functional", "sparsekit.nn", "sparsekit.bench"),
    "ops.py": ("sparsekit.functional", "sparsekit.nn", "sparsekit.bench", "sparsekit.prune"),
    "kernels": ("sparsekit.ops", "sparsekit.functional", "sparsekit.nn", "sparsekit.bench"),
    "functional.py": ("sparsekit.nn", "sparsekit.bench", "sparsekit.prune"),
    "nn": ("sparsekit.bench", "sparsekit.prune", "sparsekit.serving"),
}


def _imports(path: Path) -> set[str]:
    pkg = ".".join(("sparsekit", *path.relative_to(PKG).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(where):
    target = PKG / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    for f in files:
        bad = {m for m in _imports(f) for p in FORBIDDEN[where] if m == p or m.startswith(p + ".")}
        assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"
