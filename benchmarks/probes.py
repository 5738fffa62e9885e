"""This machine's peaks for the roofline sections: the C++ probes next to this file, compiled and run here.

isa_rate.cpp: float32 FMA (and vdpbf16ps) rate of one core; read_bw.cpp: read bandwidth by buffer size and
thread count.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def run_probe(name: str) -> str:
    """Compile benchmarks/<name>.cpp for this CPU, run it, return its stdout (CalledProcessError if either
    step fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / name
        subprocess.run(
            ["g++", "-O2", "-march=native", "-pthread", "-o", str(exe), str(HERE / f"{name}.cpp")],
            check=True,
            capture_output=True,
        )
        return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def fma_gflops(isa_rate_output: str) -> float:
    """GFLOP/s of float32 FMAs on one core, from isa_rate's output."""
    return float(re.search(r"vfmadd231ps zmm: [\d.]+ G/s = ([\d.]+) GFLOP/s", isa_rate_output).group(1))
