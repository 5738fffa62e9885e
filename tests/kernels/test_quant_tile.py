"""The int8 / int4 panel paths (csrc/quant_tile.h) equal a double-precision sum, built for this CPU (the
vector tiles) and without AVX-512 (the plain C++ fallback the header compiles elsewhere)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from meshserve.kernels.native import CSRC

CHECK = Path(__file__).parent / "quant_tile_check.cpp"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (the native build does too)")
@pytest.mark.parametrize("march", ["native", "x86-64-v2"], ids=["vector-tiles", "scalar-fallback"])
def test_every_panel_path_matches_a_double_sum(march, tmp_path):
    exe = tmp_path / "check"
    subprocess.run(
        ["g++", "-O2", "-std=c++17", f"-march={march}", f"-I{CSRC}", str(CHECK), "-o", str(exe)], check=True
    )
    worst = float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    # float32 sums of up to 120 terms, with the decode tiles' offset (<= 2.5x the terms) folded in and out
    assert worst < 1e-5
