"""The generic trainer knows no method: nothing under megatron_ext/training imports a plug-in's
package, and the checkpoint package sits below sparsity and training."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_ext"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("training", ("megatron_ext.sparsity", "megatron_ext.train")),
    ("checkpoint", ("megatron_ext.sparsity", "megatron_ext.training", "megatron_ext.train")),
    ("models", ("megatron_ext.checkpoint", "megatron_ext.sparsity", "megatron_ext.training")),
])
def test_package_imports_only_downward(package, forbidden):
    for path in sorted((PACKAGE / package).glob("*.py")):
        bad = sorted(name for name in _imports(path) if any(name == f or name.startswith(f + ".") for f in forbidden))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad[0]}"
