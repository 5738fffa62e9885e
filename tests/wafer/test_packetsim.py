"""The packet model's semantics on hand-made networks small enough to follow cycle by cycle."""

import numpy as np
import pytest

from meshserve.wafer.packetsim import NocParams, simulate_packets

# channels: 0 S's injection port, 1 link L1, 2 ejection E1, 3 link L2, 4 ejection E2, 5 T's injection
LATENCY = np.ones(6, dtype=np.int64)
EJECT = np.array([0, 0, 1, 0, 1, 0], dtype=bool)


def blocked_then_free(buffer_flits: int, blockers: int = 3) -> tuple[int, int]:
    """Source T streams ``blockers`` older packets over L1; source S then sends P1 over L1 and P2
    over the idle L2. Returns the batch's cycles with and without P2."""
    route = np.array([[5, 1, 2]] * blockers + [[0, 1, 2], [0, 3, 4]])
    source = np.array([1] * blockers + [0, 0])
    params = NocParams(flits_per_packet=4, vcs=8, vc_buffer_flits=buffer_flits, hop_cycles=1)
    both = simulate_packets(route, source, LATENCY, EJECT, params)
    return both, simulate_packets(route[:-1], source[:-1], LATENCY, EJECT, params)


def test_a_blocked_head_holds_its_source_until_its_tail_is_out():
    # 4-flit packets, 2-flit VC buffers: P1's head waits at the first router for L1 (T's three
    # packets are older and win it at t = 1, 5, 9) with two flits still in S's queue, so P2 cannot
    # leave S before P1's head has moved on (BookSim2's injection queue is a FIFO of flits):
    # P1 takes L1 at 13 (E1 at 14, done 14 + 4 + 1 = 19); S frees at 14, P2 is injected then and
    # waits for the router input P1 is still reading (free at 17): L2 at 17, E2 at 18, done 23
    both, without_p2 = blocked_then_free(buffer_flits=2)
    assert without_p2 == 19 and both == 23


def test_a_packet_that_fits_its_buffer_frees_its_source_and_can_be_overtaken():
    # 4-flit buffers hold all of P1 at the first router: S is free after 4 cycles and P2 takes
    # another VC and the idle L2 (t = 5) while P1 still waits, so it adds nothing
    both, without_p2 = blocked_then_free(buffer_flits=4)
    assert both == without_p2 == 19


@pytest.mark.parametrize("buffer_flits", [1, 2, 4, 8])
def test_without_contention_a_source_sends_back_to_back(buffer_flits):
    both, _ = blocked_then_free(buffer_flits, blockers=0)
    # P1's tail leaves S's port at 4: P2 takes it then, L2 at 5, E2 at 6, its tail is out 4 + 1 later
    assert both == 11
