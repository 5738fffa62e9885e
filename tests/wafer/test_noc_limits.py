"""`wafer noc` and `wafer simulate` estimate every dimension that scales memory before allocating: a mesh,
packet count, flit count, .npy traffic matrix or expert count too large is one line naming the field,
exit code 2, at once (it once allocated GiBs to TiBs and died with a numpy traceback)."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import yaml

from meshserve.testing import run_cli
from meshserve.wafer import topology
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.limits import ENV_BUDGET, noc_bytes
from meshserve.wafer.noc import noc_cycles, noc_platform
from meshserve.wafer.presets import PRESET_DIR

BUDGET_GIB = 0.125


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setenv(ENV_BUDGET, str(BUDGET_GIB))


def refused(args: list[str], field: str) -> str:
    start = time.perf_counter()
    result = run_cli(args)
    assert time.perf_counter() - start < 5.0
    assert result.code == 2 and result.err.startswith(f"error: {field}: "), result.err
    assert "\n" not in result.err.strip() and "Traceback" not in result.err
    return result.err


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--mesh", "4000x4000"], "hardware"),
        (["--mesh", "4x4", "--packets-per-node", str(10**12)], "packets_per_node"),
        (["--mesh", "4x4", "--packets-per-node", str(10**30)], "packets_per_node"),
        (["--mesh", "4x4", "--packets-per-node", "1", "--flits-per-packet", str(10**9)], "flits_per_packet"),
    ],
)
def test_noc_sizes_past_the_budget_are_refused_at_once(flags, field):
    assert "GiB" in refused(["wafer", "noc", *flags, "--time-model", "packet"], field)


def npy(tmp_path, array: np.ndarray, name: str = "m.npy") -> str:
    path = tmp_path / name
    np.save(path, array, allow_pickle=True)
    return str(path)


def bad_files(tmp_path) -> list[tuple[str, str]]:
    n = 16
    truncated = tmp_path / "short.npy"
    np.save(truncated, np.ones((n, n)))
    truncated.write_bytes(truncated.read_bytes()[:200])
    return [
        (npy(tmp_path, np.full((n, n), 10**15, dtype=np.int64), "huge.npy"), "GiB"),
        (npy(tmp_path, np.full((n, n), 1e300), "inf.npy"), "whole packet counts"),
        (npy(tmp_path, np.ones((n, n), dtype=complex), "complex.npy"), "dtype complex128"),
        (npy(tmp_path, np.array([[{"a": 1}] * n] * n, dtype=object), "object.npy"), "dtype object"),
        (npy(tmp_path, np.ones((n, n, 1)), "shape.npy"), "must be [16, 16]"),
        (npy(tmp_path, np.zeros(3, dtype=[("a", "i4")]), "struct.npy"), "dtype"),
        (str(truncated), "cannot be read"),
        (str(tmp_path / "garbage.npy"), "is not a .npy array"),
    ]


def test_noc_npy_inputs_are_checked_for_dtype_shape_and_size(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xffnot a header at all")
    for path, words in bad_files(tmp_path):
        err = refused(["wafer", "noc", "--mesh", "4x4", "--pattern", path, "--time-model", "flit"], "pattern")
        assert words in err, (path, err)


@pytest.mark.parametrize(
    ("k", "packets_per_node", "flits", "models"),
    [(4, 4, 40, ("packet", "flit", "bottleneck")), (2, 1, 40_000, ("packet",))],
)
def test_what_the_noc_estimate_accepts_fits_it(k, packets_per_node, flits, models):
    """The estimate covers the measured peak: many packets, and a few long ones (the packet model's
    per-cycle buffers grow with the flits of one packet)."""
    topology.topology_for.cache_clear()
    tracemalloc.start()
    try:
        noc_cycles(k, k, "uniform", packets_per_node, flits, models=models)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        topology.topology_for.cache_clear()
    assert peak <= noc_bytes(noc_platform(k, k, 1, 1), k * k * packets_per_node, flits, models)


def test_a_model_preset_with_a_huge_expert_count_is_refused_by_simulate(tmp_path):
    data = yaml.safe_load((PRESET_DIR / "models" / "deepseek-v3.yaml").read_text())
    assert load_hardware("wsc-8x8").num_devices == 64
    data["name"], data["routed_experts"] = "huge", 10**8
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    err = refused(["wafer", "simulate", "--model", str(path)], "model")
    assert "100000000 routed experts on 64 devices" in err
