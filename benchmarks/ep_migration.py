"""Live expert migration on N expert-parallel ranks: none vs invasive vs non-invasive, beside the simulator.

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/ep_migration.py [--ranks 4] [--repeats 2]

Workload: a tiny Mixtral (8 experts, top-2) made on the spot, its router skewed towards a few
experts (their gate rows scaled up), 32 requests with random prompts of 16-64 tokens and 64
output tokens each, dealt over the ranks. Every mode serves the same requests in the same order,
so step i carries the same batch in every run; runs are interleaved (none, invasive,
non-invasive, none, ...) and each figure is the median over repeats (best in brackets).

Per mode, side by side: p50 / p99 of the steady steps and of the steps a migration spans (plan,
copies, switch), in the same run; that p99 over the steady p99 (``p99_vs_steady``) and over the p99 of
the same steps in the run without balancing (``p99_vs_none``; the target: <= 1.05 for non-invasive);
stall (time the ranks waited on migration: the copies themselves when invasive, the step-boundary
switch when non-invasive); steps a migration spans; balancedness (mean/max tokens over ranks, averaged
over MoE layers, as vLLM reports it) measured from the pairs each rank's experts computed, summed over
the steps the first placement served (before the first plan) and over the steps the first
migration's placement served (its switch to the next plan); bytes moved. The "none" column reads the
non-invasive run's migration steps in two runs without balancing: the noise floor of those ratios.

Beside them, the simulator's prediction for the same placement changes (meshserve.wafer; the plans
come from the same meshserve.placement code): bytes, copy time over the nvl72 switch preset cut to
N GPUs, and balancedness of the same placements on the expert loads recorded in the same steps
(the gap to the live figure is the replica-choice rule against the model's even split).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meshserve.engine import LLM, SamplingParams
from meshserve.placement import Placement, migrations
from meshserve.testing import make_tiny_model
from meshserve.wafer.balance_setup import comm_model
from meshserve.wafer.hardware import hardware_from_dict
from meshserve.wafer.models import Attention, MoEModel
from meshserve.wafer.presets import read_preset

MODEL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
HOT_EXPERTS, HOT_SCALE = (0, 1), 3.0
MODES = {"none": None, "invasive": "invasive", "non-invasive": "non-invasive"}


def skewed_model(folder: Path) -> Path:
    """A tiny Mixtral whose router favours HOT_EXPERTS in every layer (their gate rows scaled)."""
    path = make_tiny_model(folder, arch="mixtral", **MODEL)
    weights = load_file(path / "model.safetensors")
    for name, w in weights.items():
        if name.endswith("block_sparse_moe.gate.weight"):
            w[list(HOT_EXPERTS)] *= HOT_SCALE
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def workload(n: int = 32, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, MODEL["vocab_size"], rng.integers(16, 65)).tolist()] for _ in range(n)]


def serve(model: Path, ranks: int, mode: str | None, eplb: dict, requests: int) -> dict:
    """One run: per-step wall times, routed pairs per rank, expert counts, migration records."""
    args = dict(
        data_parallel_size=ranks,
        oversubscribe=True,  # --ranks 4 on this project's 2-core machine
        enable_expert_parallel=True,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        block_size=16,
        max_model_len=256,
        eplb_config=eplb,
    )
    if mode is not None:
        args |= {"enable_eplb": True, "eplb_config": {**eplb, "mode": mode}}
    with LLM(str(model), **args) as llm:
        engine = llm.engine
        return step_workload(engine, requests) | {
            "migrations": list(engine.migrations),
            "holds": engine.holds(),
        }


def step_workload(engine, requests: int) -> dict:
    """Add ``requests`` of the workload (greedy, 64 tokens each) and step the engine to the end: per-step
    wall times, pairs routed per rank and expert counts (the step's last_stats), and each request's tokens
    in the order added."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in workload(requests)]
    times, routed, counts, out = [], [], [], {}
    while engine.has_unfinished():
        start = time.perf_counter()
        for o in engine.step():
            out[o.request_id] = o.token_ids
        times.append(time.perf_counter() - start)
        routed.append(engine.last_stats["routed"])
        counts.append(engine.last_stats["expert_counts"])
    return {
        "times": np.array(times),
        "routed": np.array(routed),
        "counts": np.array(counts),
        "tokens": [out.get(i) for i in ids],
    }


def balancedness(per_rank: np.ndarray) -> float:
    """mean/max over ranks of the load summed over steps, averaged over layers: [steps, ranks, layers].

    Summed first: one decode step holds a few dozen pairs per layer, whose sampling noise alone
    would keep a perfectly balanced placement near 0.8 step by step.
    """
    total = per_rank.sum(axis=0)
    return float((total.mean(axis=0) / np.maximum(total.max(axis=0), 1e-12)).mean())


def migration_steps(run: dict) -> np.ndarray:
    """0-based indices of the steps each successful migration spans: its plan step .. its switch step."""
    done = [m for m in run["migrations"] if not m.get("error")]
    spans = [np.arange(m["tick"] - 1, m["switch_tick"]) for m in done]
    return np.unique(np.concatenate(spans)) if spans else np.zeros(0, dtype=np.int64)


def first_placement_steps(run: dict) -> tuple[slice, slice]:
    """Steps served by the first placement (before the first plan) and by the first migration's
    placement (its switch to the next plan, or the end)."""
    done = [m for m in run["migrations"] if not m.get("error")]
    if not done:
        return slice(0, len(run["times"])), slice(0, 0)
    later = [m["tick"] for m in run["migrations"] if m["tick"] > done[0]["switch_tick"]]
    return slice(0, done[0]["tick"] - 1), slice(done[0]["switch_tick"], min(later, default=len(run["times"])))


def live_figures(run: dict, baseline: dict, steps: np.ndarray | None = None) -> dict:
    """Figures of one run; ``steps``: the migration steps to read (default: the run's own)."""
    done = [m for m in run["migrations"] if not m.get("error")]
    steps = migration_steps(run) if steps is None else steps
    steady = np.setdiff1d(np.arange(len(run["times"])), steps)
    before, after = first_placement_steps(run)
    ms = {
        name: 1e3 * np.percentile(run["times"][idx], q) if len(idx) else float("nan")
        for name, idx, q in (
            ("steady_p50", steady, 50),
            ("steady_p99", steady, 99),
            ("migr_p50", steps, 50),
            ("migr_p99", steps, 99),
        )
    }
    same = 1e3 * np.percentile(baseline["times"][steps], 99) if len(steps) else float("nan")
    mode = done[0]["mode"] if done else "none"
    stall = sum(m["migration_s"] if mode == "invasive" else m.get("switch_s", 0.0) for m in done)
    return {
        **{f"{k}_ms": v for k, v in ms.items()},
        "p99_vs_steady": ms["migr_p99"] / ms["steady_p99"],
        "p99_vs_none": ms["migr_p99"] / same,
        "stall_ms": 1e3 * stall,
        "migrations": len(done),
        "failed": len(run["migrations"]) - len(done),
        "steps_per_migration": float(np.mean([m["switch_tick"] - m["tick"] + 1 for m in done]))
        if done
        else float("nan"),
        "balancedness_before": balancedness(run["routed"][before]),
        "balancedness_after": balancedness(run["routed"][after]) if done else float("nan"),
        "bytes_moved": sum(m["bytes"] for m in done),
        "copy_s_live": sum(m["migration_s"] for m in done),
    }


def simulator_figures(run: dict, ranks: int, tokens_per_device: int) -> dict:
    """The simulator's cost of the same placement changes on the nvl72 switch preset cut to ``ranks`` GPUs."""
    preset = read_preset("hardware", "nvl72", "hardware")
    preset["switch"] |= {"devices": ranks, "devices_per_node": ranks}
    hw = hardware_from_dict(preset, f"nvl72-{ranks}")
    m = MODEL
    model = MoEModel(
        name="tiny-mixtral",
        hidden_size=m["hidden_size"],
        num_layers=m["num_hidden_layers"],
        first_dense_layers=0,
        dense_intermediate_size=0,
        routed_experts=m["num_local_experts"],
        shared_experts=0,
        top_k=m["num_experts_per_tok"],
        moe_intermediate_size=m["intermediate_size"],
        bytes_per_element=4,
        attention=Attention("gqa", m["num_attention_heads"], m["num_key_value_heads"], 64),
    )
    comm = comm_model(hw, 1, "baseline", model, tokens_per_device)
    expert_bytes = model.expert_params * model.bytes_per_element
    done = [m for m in run["migrations"] if not m.get("error")]
    nbytes, copy_s = 0, 0.0
    for m in done:
        old, new = (Placement(m[k], int(m[k].sum(axis=1).max())) for k in ("holds_before", "holds_after"))
        moves = migrations(old, new, comm.hops)
        nbytes += len(moves) * expert_bytes
        copy_s += comm.transfer_time(moves.src, moves.dst, np.full(len(moves), float(expert_bytes)))
    figures = {"bytes_moved": nbytes, "copy_s": copy_s}
    if done:  # the placements' device loads on the expert loads the live run recorded in those steps
        before, after = first_placement_steps(run)
        for name, holds, steps in (
            ("before", done[0]["holds_before"], before),
            ("after", done[0]["holds_after"], after),
        ):
            load = Placement(holds, int(holds.sum(axis=1).max())).device_load(run["counts"][steps])
            figures[f"balancedness_{name}"] = balancedness(load.transpose(0, 2, 1))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32, help="Requests served per run (64 tokens each).")
    parser.add_argument("--balancer", default="greedy", choices=("greedy", "topology", "ni"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    eplb = {
        "window_size": 8,
        "step_interval": 16,
        "num_redundant_experts": args.ranks,
        "balancer": args.balancer,
        "chunk_bytes": 1 << 18,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = skewed_model(Path(tmp))
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        with tqdm(total=args.repeats * len(MODES), desc="runs") as bar:
            for _ in range(args.repeats):
                for name, mode in MODES.items():
                    runs[name].append(serve(model, args.ranks, mode, eplb, args.requests))
                    bar.update(1)
    tokens_per_device = 128 // args.ranks
    print(
        f"{args.ranks} ranks (gloo, CPU, 1 thread each, shared machine), balancer {args.balancer}, "
        f"{args.repeats} interleaved repeats; median [best] per figure"
    )
    # "none" read over the non-invasive run's migration steps: the noise floor of the p99 ratios.
    steps = [migration_steps(run) for run in runs["non-invasive"]]
    figures = {
        "none": [
            live_figures(run, other, s)
            for run, other, s in zip(runs["none"], runs["none"][1:] + runs["none"][:1], steps, strict=True)
        ]
    }
    for name in ("invasive", "non-invasive"):
        figures[name] = [live_figures(run, base) for run, base in zip(runs[name], runs["none"], strict=True)]
    print(f"\n{'figure':24s}" + "".join(f"{name:>22s}" for name in figures))
    for key in figures["invasive"][0]:
        row = f"{key:24s}"
        for name in figures:
            values = np.array([f[key] for f in figures[name]], dtype=np.float64)
            best = values.max() if key.startswith("balancedness") else values.min()
            row += f"{np.median(values):12.4g} [{best:7.4g}]"
        print(row)
    print("\nsimulator (nvl72 switch cut to the same ranks; first repeat's placement changes, same planner):")
    sims = {
        name: simulator_figures(runs[name][0], args.ranks, tokens_per_device)
        for name in ("invasive", "non-invasive")
    }
    for key in sims["invasive"]:
        print(
            f"{'sim_' + key:24s}{'':22s}"
            + "".join(f"{sims[name].get(key, float('nan')):12.4g}{'':10s}" for name in sims)
        )
    print(
        "\n(none's p99_vs_none compares two runs without balancing over the non-invasive run's migration "
        "steps: the noise floor)"
    )


if __name__ == "__main__":
    main()
