"""kernels/ is a leaf (docs: DESIGN.md, "Boundaries"): no kernel module imports the models, the engine or
the engine's config, at run time or for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import meshserve

KERNELS = Path(meshserve.__file__).parent / "kernels"
FORBIDDEN = ("meshserve.models", "meshserve.engine", "meshserve.config")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function bodies and TYPE_CHECKING blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_kernel_module_imports_models_engine_or_config():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 10  # the walk found the package
    bad = {
        f"{path.relative_to(KERNELS)}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"kernels/ must stay a leaf, but: {sorted(bad)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from meshserve import config\n    import meshserve.models.loader\n")
    assert {"meshserve.config", "meshserve.models.loader"} <= imported_modules(path)
