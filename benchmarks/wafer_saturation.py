"""Where does a mesh link saturate? The default of costs.yaml's ``migration_link_ceiling``.

A saturated uniform all-to-all (100 packets of 20 flits per node, XY, 8 VCs: the BookSim2 check's
settings) on the project's flit model: the busiest link carries ``bottleneck`` cycles of flits
(the bottleneck model's time) while the whole batch takes ``flit`` cycles, so that link is busy
bottleneck / flit of the time at best: the highest utilisation a streamed migration can count on.
Printed beside BookSim2's own ratio (experiments/noc_reference.yaml) and the value costs.yaml uses.

Run: .venv/bin/python benchmarks/wafer_saturation.py [--mesh 8]
"""

from __future__ import annotations

import argparse

from meshserve.wafer.costs import default_costs
from meshserve.wafer.noc import noc_cycles
from meshserve.wafer.presets import PRESET_DIR, read_yaml


def saturation(size: int) -> float:
    """Busiest link's utilisation over a saturated uniform all-to-all on a size x size mesh."""
    cycles = noc_cycles(size, size, "uniform", 100, 20, models=("bottleneck", "flit"))["cycles"]
    return cycles["bottleneck"] / cycles["flit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    booksim = read_yaml(PRESET_DIR / "experiments" / "noc_reference.yaml", "noc")[
        "booksim_bottleneck_over_cycle"
    ]
    for size in args.mesh:
        print(f"{size}x{size} uniform: flit model {saturation(size):.3f}, BookSim2 {booksim.get(size, '-')}")
    print(f"costs.yaml migration_link_ceiling: {default_costs().migration_link_ceiling:.2f} (the 8x8 figure)")


if __name__ == "__main__":
    main()
