"""How fast is the wafer simulator? Prints one (mapping, layer) evaluation on 8x8 and the full
`reproduce comm` sweep, each beside its target (10 ms and 60 s on 2 cores), then the NoC time
models' error against BookSim2's measured cycles, the packet and flit models' speed on 4x4-16x16
and the packet and flit models with 1, 2 and 4 injection ports per node on 8x8.

Run: .venv/bin/python benchmarks/wafer_speed.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

from meshserve.wafer.experiments import run_comm
from meshserve.wafer.hardware import load_hardware
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import load_model
from meshserve.wafer.plots import comparison_png
from meshserve.wafer.simulate import simulate_layer
from meshserve.wafer.topology import topology_for


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def noc_speed() -> None:
    """Every time model on the saturated uniform batch: speed and error vs BookSim2's measured cycles
    (benchmarks/noc_validation.py prints every pattern)."""
    from meshserve.wafer.noc import booksim_reference, noc_cycles

    for side in (4, 8, 16):
        result = noc_cycles(
            side, side, "uniform", 100, 20, models=("bottleneck", "fair-share", "packet", "flit")
        )
        booksim = booksim_reference(result)
        for model, cycles in result["cycles"].items():
            vs = "" if booksim is None else f" = {cycles / booksim:.3f}x BookSim2 ({booksim:,.0f})"
            print(
                f"noc uniform {side}x{side}, 100 x 20-flit packets/node, {model:10s}: "
                f"{cycles:6,} cycles{vs}; took {result['seconds'][model]:.2f} s"
            )


def port_sweep() -> None:
    """Packet and flit models on the 8x8 uniform batch with 1, 2 and 4 injection/ejection ports per node."""
    from meshserve.wafer.noc import noc_cycles

    for ports in (1, 2, 4):
        result = noc_cycles(
            8, 8, "uniform", 100, 20, models=("bottleneck", "packet", "flit"), injection_ports=ports
        )
        cycles, took = result["cycles"], result["seconds"]
        print(
            f"noc uniform 8x8, {ports} injection port(s) per node: flit {cycles['flit']:,} cycles, "
            f"packet {cycles['packet']:,}, bottleneck {cycles['bottleneck']:,}; "
            f"flit took {took['flit']:.2f} s, packet {took['packet']:.2f} s"
        )


def main() -> None:
    hw, model = load_hardware("wsc-8x8"), load_model("deepseek-v3")
    build = timed(lambda: topology_for.__wrapped__(hw), 5)
    topology_for(hw)
    print(f"topology build wsc-8x8 (routes of 4096 pairs, once per platform): {min(build) * 1e3:.2f} ms")
    for kind in ("baseline", "er", "er-bal"):
        mapping = make_mapping(hw, 4, kind)
        for time_model in ("bottleneck", "fair-share"):
            runs = timed(lambda m=mapping, t=time_model: simulate_layer(hw, model, m, 64, time_model=t), 30)
            median = statistics.median(runs) * 1e3
            print(
                f"one MoE layer, wsc-8x8, {kind:8s} TP=4, {time_model:10s}: median {median:7.2f} ms "
                f"(target 10 ms: {median / 10:.2f}x of target)"
            )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_comm(64, "bottleneck", progress=False)
        comparison_png(result, f"{tmp}/comm.png")
        total = time.perf_counter() - start
    print(
        f"full reproduce comm (bottleneck, {len(result['rows'])} comparison rows + "
        f"{result['regimes_total']} open-question regimes, plot included): {total:.2f} s "
        f"(target 60 s: {total / 60:.3f}x of target)"
    )
    noc_speed()
    port_sweep()


if __name__ == "__main__":
    main()
