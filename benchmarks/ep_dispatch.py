"""Balanced against even expert-parallel dispatch on N local ranks: per-step rank load and step time.

    flock /tmp/bench.lock .venv/bin/python benchmarks/ep_dispatch.py [--ranks 2 4] [--repeats 2]

Workload: ep_migration.py's tiny Mixtral (8 experts, top-2, router skewed towards experts 0 and 1)
and its 32 requests (16-64 prompt tokens, 64 output tokens each), served with ``ranks`` redundant
replicas per MoE layer (spread_placement: experts 0, 1, ... get them in turn, so the hot ones are
replicated) and no live balancing, once per dispatch rule; runs interleaved (even, balanced, even,
...). Per rule: the mean over steps and MoE layers of max/mean pairs computed per rank (one step's
imbalance, what that step waits for), the same on the loads summed over the run, the p50 / p90 step
time (median over repeats), and whether the greedy tokens equal the even rule's. Then the balanced
rule's quota solve alone (balanced.replica_bounds, what every rank runs per MoE layer per step) on
the run's own per-layer expert counts: the native operator and its numpy reference, microseconds
per layer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from ep_migration import skewed_model, step_workload

from meshserve.engine import LLM
from meshserve.engine.distributed.balanced import replica_bounds, replica_bounds_reference
from meshserve.engine.distributed.expert_map import spread_placement
from meshserve.kernels import native

RULES = ("even", "balanced")


def serve(model: Path, ranks: int, rule: str, requests: int) -> dict:
    """One run: per-step wall time, pairs computed per rank [steps, ranks, moe_layers], pairs per expert
    [steps, moe_layers, experts] and the tokens."""
    args = dict(
        data_parallel_size=ranks,
        oversubscribe=True,  # --ranks 4 on a 2-core machine
        enable_expert_parallel=True,
        eplb_config={"num_redundant_experts": ranks},
        ep_dispatch=rule,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        block_size=16,
        max_model_len=256,
    )
    with LLM(str(model), **args) as llm:
        return step_workload(llm.engine, requests)


def solve_us(counts: np.ndarray, ranks: int) -> dict[str, float]:
    """Mean microseconds of one MoE layer's quota solve over counts [steps, moe_layers, experts] on the run's
    placement (spread_placement with ``ranks`` redundant replicas), native and numpy reference."""
    steps, layers, experts = counts.shape
    holds = spread_placement(layers, experts, ranks, ranks)
    out = {}
    for name, solve in (("native", replica_bounds), ("numpy reference", replica_bounds_reference)):
        if name == "native" and not native.load():
            continue
        start = time.perf_counter()
        for step in counts:
            for layer, c in enumerate(step):
                solve(holds[layer], c)
        out[name] = 1e6 * (time.perf_counter() - start) / (steps * layers)
    return out


def max_over_mean(routed: np.ndarray) -> float:
    """max/mean over ranks of [..., ranks, layers], averaged over what is left where the mean is > 0."""
    mean = routed.mean(axis=-2)
    return float((routed.max(axis=-2)[mean > 0] / mean[mean > 0]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = skewed_model(Path(tmp) / "model")
        for ranks in args.ranks:
            runs = {rule: [] for rule in RULES}
            for _ in range(args.repeats):
                for rule in RULES:
                    runs[rule].append(serve(model, ranks, rule, args.requests))
            print(f"\n{ranks} ranks, {ranks} redundant replicas per MoE layer, {args.requests} requests:")
            print("rule      step max/mean  run max/mean  step p50 ms  step p90 ms  steps  tokens = even's")
            for rule in RULES:
                first = runs[rule][0]
                p50 = np.median([1e3 * np.percentile(r["times"], 50) for r in runs[rule]])
                p90 = np.median([1e3 * np.percentile(r["times"], 90) for r in runs[rule]])
                same = all(r["tokens"] == runs["even"][0]["tokens"] for r in runs[rule])
                print(
                    f"{rule:9} {max_over_mean(first['routed']):13.3f} "
                    f"{max_over_mean(first['routed'].sum(axis=0)):13.3f} {p50:12.1f} {p90:12.1f} "
                    f"{len(first['times']):6d}  {same}"
                )
            solve = solve_us(runs["balanced"][0]["counts"], ranks)
            print(
                "balanced quota solve per MoE layer: "
                + ", ".join(f"{k} {v:.1f} us" for k, v in solve.items())
            )


if __name__ == "__main__":
    main()
