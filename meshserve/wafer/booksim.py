"""BookSim2's measured cycles, the cycle-level reference the NoC time models are validated against.

`presets/experiments/booksim2_cycles.yaml` holds one saturated batch per (k x k mesh, injection ports,
pattern), measured by `benchmarks/booksim_reference.py` (100 packets of 20 flits per die, XY, 8 VCs
of 8 flits). One port per die is BookSim2's `mesh`; four are its `cmesh` (four terminals per router,
25 packets each, the pattern applied to the 2k x 2k grid of terminals), so a four-port run's die-level
matrix sums its terminals' flows per router pair.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from meshserve.wafer.noc import packet_matrix, permutation
from meshserve.wafer.presets import PRESET_DIR, read_yaml

REFERENCE_FILE = PRESET_DIR / "experiments" / "booksim2_cycles.yaml"
CMESH_TERMINALS = 4  # BookSim2's cmesh: c = 4 terminals per router on a 2 x 2 grid


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """One BookSim2 batch (mean over seeds where it has several)."""

    mesh: int
    ports: int
    pattern: str
    cycles: float
    seeds: int


@functools.cache
def reference_data() -> dict:
    return read_yaml(REFERENCE_FILE, "booksim2")


def reference_runs() -> list[ReferenceRun]:
    """Every measured batch, in the file's order."""
    return [
        ReferenceRun(r["mesh"], r["ports"], r["pattern"], float(np.mean(r["cycles"])), len(r["cycles"]))
        for r in reference_data()["runs"]
    ]


def settings() -> tuple[int, int]:
    """(packets per die, flits per packet) of every reference batch."""
    s = reference_data()["settings"]
    return int(s["packets_per_node"]), int(s["flits_per_packet"])


def terminal_destinations(run: ReferenceRun) -> np.ndarray:
    """[terminals] destination of every terminal (a die per terminal with one port, four with four)."""
    side = run.mesh * (2 if run.ports == CMESH_TERMINALS else 1)
    if run.pattern == "randperm":  # BookSim2's own permutation (perm_seed 0), read from the file
        return np.asarray(reference_data()["randperm_destinations"][side * side], dtype=np.int64)
    return permutation(run.pattern, side, side)


def reference_matrix(run: ReferenceRun, seed: int = 0) -> np.ndarray:
    """[dies, dies] packets the run sent (uniform: our own seeded draw of the same distribution)."""
    packets, _ = settings()
    if run.pattern == "uniform":
        return packet_matrix("uniform", run.mesh, run.mesh, packets, seed)
    if run.ports == 1:
        out = np.zeros((run.mesh**2, run.mesh**2), dtype=np.int64)
        out[np.arange(run.mesh**2), terminal_destinations(run)] = packets
        return out
    grid = 2 * run.mesh  # terminal t sits at (t // grid, t % grid); its router at (row // 2, col // 2)
    t = np.arange(grid * grid)
    router = (t // grid // 2) * run.mesh + (t % grid) // 2
    out = np.zeros((run.mesh**2, run.mesh**2), dtype=np.int64)
    np.add.at(out, (router, router[terminal_destinations(run)]), packets // CMESH_TERMINALS)
    return out


def reference_cycles(pattern: str, mesh: str, ports: int, packets_per_node: int, flits: int) -> float | None:
    """BookSim2's cycles for a `meshserve wafer noc` run that sent what the reference sent, else None.

    Same batch size and packet length, a square mesh that was measured, and a pattern whose packets
    are ours too: any at one port but randperm (BookSim2 draws its own permutation), uniform at four.
    """
    rows, _, cols = mesh.partition("x")
    if (packets_per_node, flits) != settings() or rows != cols:
        return None
    if pattern == "randperm" or (ports != 1 and pattern != "uniform"):
        return None
    for run in reference_runs():
        if (run.mesh, run.ports, run.pattern) == (int(rows), ports, pattern):
            return run.cycles
    return None
