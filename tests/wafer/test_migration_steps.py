"""NI-Balancer's migration steps: a copy splits into local / global / local legs at FTD borders."""

import numpy as np

from meshserve.placement import Placement, migrations
from meshserve.wafer.balance.steps import GLOBAL, LOCAL, split_steps


def mesh_hops(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])


def test_ni_steps_split_at_ftd_borders():
    hops = mesh_hops(4, 4)
    r, c = np.divmod(np.arange(16), 4)
    ftd = (r // 2) * 2 + c // 2  # four 2x2 blocks
    old = Placement(np.eye(16, dtype=bool)[None], 2)
    holds = old.holds.copy()
    holds[0, 0, 15] = True  # (0,0) -> (3,3): across blocks
    holds[0, 1, 4] = True  # (0,1) -> (1,0): inside block 0
    steps = split_steps(migrations(old, Placement(holds, 2), hops), ftd, hops)
    legs = list(
        zip(steps.copy.tolist(), steps.phase.tolist(), steps.src.tolist(), steps.dst.tolist(), strict=True)
    )
    # copy 0 is expert 0: local (0 -> 5, nearest exit of block 0), global (5 -> 10), local (10 -> 15)
    assert legs == [(0, LOCAL, 0, 5), (0, GLOBAL, 5, 10), (0, LOCAL, 10, 15), (1, LOCAL, 1, 4)]
