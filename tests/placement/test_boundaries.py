"""The halves meet only in placement plans and traces: placement and wafer import no torch and no engine."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("meshserve.placement", ("torch", "meshserve.engine", "meshserve.wafer", "meshserve.models")),
        ("meshserve.wafer.cli", ("torch", "meshserve.engine", "meshserve.models")),
    ],
)
def test_package_never_imports_forbidden_modules(package, forbidden):
    code = f"import sys, {package}; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = run.stdout.split()
    leaks = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert leaks == []
