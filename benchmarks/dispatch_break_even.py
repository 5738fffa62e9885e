"""Does the balanced dispatch pay for its solve? Saving per MoE layer, in microseconds, by batch.

Runs the steady curve's two ni-eplb kinds only (even dispatch, and balanced with a free solve) on
the first model of presets/experiments/balance.yaml, then prints what levelling saves per layer
and the tokens per device from which a solve of 0-100 us per layer pays (steady_curve.py,
``dispatch_break_even``; DeepSeek's LPLB reports ~100 us per solve).

Run: .venv/bin/python benchmarks/dispatch_break_even.py [--iterations 60] [--tokens 32 64 128]
"""

from __future__ import annotations

import argparse
import time

from meshserve.wafer.balance import BalanceConfig
from meshserve.wafer.reproduce_balance import load_spec
from meshserve.wafer.steady_curve import break_even_text, ni_steady_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    spec = load_spec()
    c = spec["curves"]["ni_steady"]
    c.update(iterations=args.iterations, tokens_per_device=args.tokens)
    c["runs"] = {k: v for k, v in c["runs"].items() if k in ("ni_eplb", "ni_eplb_balanced")}
    spec["iterations"] = args.iterations
    start = time.perf_counter()
    curve = ni_steady_curve(spec, BalanceConfig(), progress=False)
    even = curve["break_even"]
    layers = curve["num_moe_layers"]
    print(f"{curve['model']}, {curve['iterations']} iterations (second half), {layers} MoE layers")
    for p, us in zip(curve["points"], even["saving_us_per_layer"], strict=True):
        mark = "" if p["fits_memory"] else f" (does not fit: {p['memory_need_gb']:.0f} GB per die)"
        even_ms, level_ms = (p[k]["moe_ms_per_iteration"] for k in ("ni_eplb", "ni_eplb_balanced"))
        print(
            f"  {p['tokens_per_device']:>4} tokens/device: saves {us:+7.2f} us per layer; MoE ms/iteration "
            f"even {even_ms:.3f}, balanced {level_ms:.3f}{mark}"
        )
    for solve, tokens in even["tokens_per_device"].items():
        where = break_even_text(even["saving_us_per_layer"], float(solve), tokens)
        print(f"  dispatch_solve_us {float(solve):>5g}: {where}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
