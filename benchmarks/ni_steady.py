"""ni-eplb's steady state per model: the steady_gap rows (floor, forecast, planner, simulated) and stall.

Runs the ladder's ni-eplb rung (presets/experiments/balance.yaml, role ``ours``, with the spec's
settings) with ``run_setup`` and breaks its steady max/mean down with ``steady_gap`` (docs/wafer.md,
"Steady state"), one row per model, everything side by side. Deterministic for a seed; the wall
time is the only figure that depends on the machine.

    nice -n 15 .venv/bin/python benchmarks/ni_steady.py [--iterations 300] [--models deepseek-v3,...]
                                                         [--dispatch even|balanced]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small matrices: a second BLAS thread only spins

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from meshserve.wafer.balance import BalanceConfig  # noqa: E402
from meshserve.wafer.balance_setup import BalanceSetup, run_setup  # noqa: E402
from meshserve.wafer.reproduce_balance import load_spec  # noqa: E402
from meshserve.wafer.steady import steady_gap  # noqa: E402
from meshserve.wafer.steady_curve import GAP_STEPS as STEPS  # noqa: E402


def main() -> None:
    spec = load_spec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=spec["iterations"])
    parser.add_argument("--tokens-per-device", type=int, default=spec["tokens_per_device"])
    parser.add_argument("--models", default=",".join(spec["models"]))
    parser.add_argument("--plan-slack", type=float, default=None, help="default: the rung's")
    parser.add_argument(
        "--dispatch",
        choices=("even", "balanced"),
        default="even",
        help="even: the ours rung; balanced: the ours_balanced rung (balance.yaml roles)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model as well")
    args = parser.parse_args()
    role = "ours" if args.dispatch == "even" else "ours_balanced"
    rung = next(r for r in [*spec["ladder"], *spec["references"]] if r.label == spec["roles"][role])
    config = rung.balance_config(BalanceConfig())
    if args.plan_slack is not None:
        config = dataclasses.replace(config, plan_slack=args.plan_slack)
    settings = {k: spec[k] for k in ("tp", "scenario", "seed", "time_model")}
    print(
        f"{'model':<18}"
        + "".join(f"{k:>11}" for k in STEPS)
        + f"{'time/even':>11}{'stall ms':>10}{'plans':>7}{'TB':>7}{'wall s':>8}",
        flush=True,
    )
    for model in args.models.split(","):
        start = time.perf_counter()
        setup = BalanceSetup(
            model=model,
            hardware=rung.hardware,
            mapping=rung.mapping,
            balancer=rung.balancer,
            tokens_per_device=args.tokens_per_device,
            iterations=args.iterations,
            config=config,
            **settings,
        )
        result = run_setup(setup)
        gap = steady_gap(setup, result)
        s = result.summary()
        wall = time.perf_counter() - start
        cells = "".join(f"{gap.get(k, {}).get('per_iteration', float('nan')):>11.4f}" for k in STEPS)
        print(
            f"{model:<18}{cells}{gap['simulated'].get('time_over_even', 0):>11.4f}"
            f"{s['stall_s'] * 1e3:>10.1f}{s['plans']:>7}{s['migrated_bytes'] / 1e12:>7.1f}{wall:>8.0f}",
            flush=True,
        )
        if args.json:
            print(json.dumps({"model": model, "steady_gap": gap, "summary": s}))


if __name__ == "__main__":
    main()
