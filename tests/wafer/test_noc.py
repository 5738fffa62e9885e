"""`meshserve wafer noc`: BookSim traffic patterns and the congestion-aware packet model's bounds."""

import json
import subprocess
import sys
from unittest.mock import patch

import numpy as np
import pytest
from typer.testing import CliRunner

from meshserve.cli import app
from meshserve.errors import InputError
from meshserve.wafer.noc import noc_cycles, noc_defaults, packet_matrix, permutation


@pytest.mark.parametrize(
    "pattern", ["transpose", "bitcomp", "bitrev", "shuffle", "tornado", "neighbor", "randperm"]
)
@pytest.mark.parametrize("k", [4, 8])
def test_permutation_patterns_are_permutations(pattern, k):
    dest = permutation(pattern, k, k)
    assert sorted(dest) == list(range(k * k))


def booksim_digit_permutation(source: int, k: int, shift: int) -> int:
    """BookSim2's tornado / neighbor (traffic.cpp): every base-k digit moved by `shift`, mod k."""
    return sum(((source // k**d) % k + shift) % k * k**d for d in range(2))


@pytest.mark.parametrize("k", [4, 5, 8])
def test_patterns_follow_booksim_definitions(k):
    n = k * k
    nodes = range(n)
    assert list(permutation("tornado", k, k)) == [
        booksim_digit_permutation(s, k, (k + 1) // 2 - 1) for s in nodes
    ]
    assert list(permutation("neighbor", k, k)) == [booksim_digit_permutation(s, k, 1) for s in nodes]
    if n & (n - 1) == 0:  # the bit patterns, on power-of-two node counts
        bits = n.bit_length() - 1
        assert list(permutation("bitcomp", k, k)) == [~s & (n - 1) for s in nodes]
        assert list(permutation("bitrev", k, k)) == [int(f"{s:0{bits}b}"[::-1], 2) for s in nodes]
        assert list(permutation("shuffle", k, k)) == [
            ((s << 1) & (n - 1)) | bool((s << 1) & n) for s in nodes
        ]
    assert permutation("transpose", 4, 4)[1 * 4 + 2] == 2 * 4 + 1  # node id = r * 4 + c
    with pytest.raises(InputError, match="square"):
        permutation("transpose", 4, 8)
    with pytest.raises(InputError, match="power-of-two"):
        permutation("bitrev", 3, 4)


def test_a_node_a_permutation_maps_to_itself_keeps_its_packets_as_booksim():
    packets = packet_matrix("transpose", 4, 4, 10)
    assert packets[5, 5] == 10 and packets.sum() == 160  # (1, 1) sends to itself, through its two ports


def shift_right(tmp_path, packets: int) -> str:
    """Every node of a 4x4 mesh but the last column sends to its right-hand neighbour: no shared link."""
    matrix = np.zeros((16, 16))
    for node in range(16):
        if node % 4 != 3:
            matrix[node, node + 1] = packets
    np.save(tmp_path / "shift.npy", matrix)
    return str(tmp_path / "shift.npy")


def test_uniform_sends_packets_to_every_node_itself_included_evenly_as_booksim(tmp_path):
    packets = packet_matrix("uniform", 4, 4, 48, seed=1)
    assert (packets == 3).all()  # 48 packets over 16 nodes (BookSim's RandomInt(nodes - 1) is inclusive)
    # a packet to its own node crosses only that node's injection and ejection ports
    alone = np.zeros((16, 16))
    alone[5, 5] = 2
    np.save(tmp_path / "alone.npy", alone)
    cycles = noc_cycles(4, 4, str(tmp_path / "alone.npy"), 1, 20, models=("flit", "packet"))["cycles"]
    assert cycles["flit"] == cycles["packet"] == 2 * 20 + 2  # two packets through two one-cycle ports


def test_one_flow_takes_exactly_the_bottleneck_time(tmp_path):
    packets = np.zeros((16, 16))
    packets[0, 15] = 7  # (0,0) -> (3,3): 6 hops
    np.save(tmp_path / "one.npy", packets)
    cycles = noc_cycles(4, 4, str(tmp_path / "one.npy"), 1, 20)["cycles"]
    assert cycles["flit"] == cycles["packet"] == cycles["bottleneck"] == 7 * 20 + 6 * 5 + 2
    cycles = noc_cycles(4, 4, shift_right(tmp_path, 3), 1, 20)["cycles"]  # flows that never share a link
    assert cycles["flit"] == cycles["packet"] == cycles["bottleneck"]


@pytest.mark.parametrize("model", ["packet", "flit"])
@pytest.mark.parametrize("pattern", ["uniform", "transpose", "bitcomp", "tornado"])
def test_congestion_models_are_never_faster_than_the_bottleneck_bound(pattern, model):
    result = noc_cycles(4, 4, pattern, 12, 20, models=("bottleneck", model))
    bound = result["cycles"]["bottleneck"]  # hottest channel's flits + the longest route's latency
    # the hottest channel's flits are a hard bound; the latency term can overlap with them
    assert bound - (6 * 5 + 2) <= result["cycles"][model]
    assert result["cycles"][model] >= 12 * 20  # every node injects 12 x 20 flits through one port
    if pattern == "uniform":  # contention: strictly slower than the bound
        assert result["cycles"][model] > bound


def test_contention_slows_the_congestion_models_where_flow_models_see_none():
    cycles = noc_cycles(4, 4, "uniform", 30, 20)["cycles"]
    assert cycles["flit"] > cycles["bottleneck"] == cycles["fair-share"]
    assert cycles["packet"] > cycles["bottleneck"]


def test_cli_prints_cycles_per_model_as_json(tmp_path):
    runner = CliRunner()
    args = ["--mesh", "4x4", "--pattern", "bitcomp", "--packets-per-node", "5", "--flits-per-packet", "4"]
    result = runner.invoke(app, ["wafer", "noc", *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["cycles"]) == {"bottleneck", "fair-share", "packet", "flit"} and data["default"] == "flit"
    matrix = np.zeros((16, 16))
    matrix[0, 5] = 3
    np.save(tmp_path / "m.npy", matrix)
    result = runner.invoke(
        app,
        [
            "wafer",
            "noc",
            "--mesh",
            "4x4",
            "--pattern",
            str(tmp_path / "m.npy"),
            "--flits-per-packet",
            "4",
            "--time-model",
            "bottleneck",
            "--json",
        ],
    )
    assert json.loads(result.stdout)["cycles"] == {"bottleneck": 3 * 4 + 2 * 5 + 2}


def test_bad_mesh_is_one_line_and_exit_code_2():
    command = [sys.executable, "-c", "from meshserve.cli import main; main()", "wafer", "noc", "--mesh", "8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "error: mesh: must be RxC like 8x8, got '8'\n"


@pytest.mark.parametrize("model", ["packet", "flit"])
def test_injection_ports_follow_the_port_bandwidth_and_only_help_where_the_port_limits(model, tmp_path):
    one, two = (
        noc_cycles(4, 4, "uniform", 20, 20, models=("bottleneck", model), injection_ports=p) for p in (1, 2)
    )
    assert one["injection_ports"] == 1 and two["injection_ports"] == 2
    assert noc_cycles(4, 4, "uniform", 20, 20, models=(model,))["cycles"][model] == one["cycles"][model]
    assert two["cycles"]["bottleneck"] <= two["cycles"][model] < one["cycles"][model]  # two packets at once
    # one flow per node over one link: the link, not the port, limits, so a second port changes nothing
    single = [
        noc_cycles(4, 4, shift_right(tmp_path, 5), 1, 20, models=(model,), injection_ports=p)["cycles"][model]
        for p in (1, 2)
    ]
    assert single[0] == single[1]
    # two packets to the node itself: one after the other through one port, side by side through two
    alone = np.zeros((16, 16))
    alone[5, 5] = 2
    np.save(tmp_path / "alone.npy", alone)
    both = [
        noc_cycles(4, 4, str(tmp_path / "alone.npy"), 1, 20, models=(model,), injection_ports=p)
        for p in (1, 2)
    ]
    # (the flit model's one-iteration VC allocation may give the second packet its VC a cycle later)
    assert [b["cycles"][model] for b in both] in ([2 * 20 + 2, 20 + 2], [2 * 20 + 2, 20 + 3])
    with pytest.raises(InputError) as err:
        noc_cycles(4, 4, "uniform", 1, 1, injection_ports=0)
    assert err.value.field == "injection_ports"


def test_round_robin_vc_allocation_is_a_separate_model_with_the_same_bounds():
    # on 4x4 uniform traffic the VC allocation order matters: round robin lets flows fall behind
    result = noc_cycles(4, 4, "uniform", 30, 20, models=("bottleneck", "flit", "flit-rr"))
    cycles = result["cycles"]
    assert cycles["flit-rr"] >= cycles["bottleneck"] - (6 * 5 + 2) and cycles["flit-rr"] >= 30 * 20
    assert cycles["flit-rr"] != cycles["flit"]
    assert set(noc_cycles(4, 4, "bitcomp", 2, 4)["cycles"]) == {"bottleneck", "fair-share", "packet", "flit"}


def test_die_to_die_links_need_bandwidth_delay_product_buffers(tmp_path):
    # one flow over 6 hops of 100-cycle links: each die-to-die VC buffers the 200-cycle credit round trip,
    # so the links stay busy (the bottleneck time); with the on-chip set's 8-flit buffers the flow waits
    # for credits most of the time
    one = np.zeros((16, 16))
    one[0, 15] = 20
    np.save(tmp_path / "one.npy", one)
    d2d = noc_cycles(
        4, 4, str(tmp_path / "one.npy"), 1, 20, models=("bottleneck", "flit"), router="die-to-die"
    )
    assert d2d["router"] == "die-to-die"
    assert d2d["cycles"]["flit"] == d2d["cycles"]["bottleneck"] == 20 * 20 + 6 * 100 + 2
    small = dict(noc_defaults("die-to-die"), vc_buffer_flits=8)
    with patch("meshserve.wafer.noc.noc_defaults", lambda router: small):
        starved = noc_cycles(4, 4, str(tmp_path / "one.npy"), 1, 20, models=("flit",), router="die-to-die")
    assert starved["cycles"]["flit"] > 3 * d2d["cycles"]["flit"]
    with pytest.raises(InputError, match="router"):
        noc_cycles(4, 4, "uniform", 1, 1, router="off-chip")
