"""Batch-1 decode latency of small models: what one engine step costs when per-forward overhead, not FLOPs,
decides it (the shipped draft must be much cheaper per step than its target for speculation to pay).

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/forward_latency.py [--tokens 64]
        [--repeats 5] [--dtypes bfloat16 float32] [--threads 1]

Models: the shipped tiny-draft (0.6M) and tiny-moe (10.6M, 2.3M active) plus throughput.py's llama-5m
(random weights).
Each generates --tokens tokens for one 32-token prompt (greedy, ignore_eos) with the fused native
elementwise ops (kernels/fused.py) and with their torch references (MESHSERVE_FUSED=reference),
alternating, so both columns see the same machine noise. Printed: the median per-step ms of the decode
steps (prefill excluded) over --repeats runs, and the tokens/s that gives.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from throughput import MODELS

from meshserve.engine import LLM, SamplingParams
from meshserve.testing import make_tiny_model

ASSETS = Path(__file__).resolve().parents[1] / "meshserve" / "assets" / "models"
MODES = {"fused": "native", "reference": "reference"}


def step_ms(llm: LLM, prompt: list[int], tokens: int) -> float:
    """Per decode step ms: a run of `tokens` tokens minus a run of 1 token (the prefill), over tokens - 1."""

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    return (run(tokens) - run(1)) / (tokens - 1) * 1e3


def measure(path: Path, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    # One engine per mode: an engine reads its switches once, at start (meshserve/switches.py).
    llms = {
        mode: LLM(
            str(path),
            dtype=dtype,
            max_num_batched_tokens=512,
            max_num_seqs=8,
            kv_cache_memory=0.05,
            num_threads=args.threads,
            enable_prefix_caching=False,
            switches={"MESHSERVE_FUSED": value},
        )
        for mode, value in MODES.items()
    }
    prompt = list(range(10, 42))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for mode, llm in llms.items():
            times[mode].append(step_ms(llm, prompt, args.tokens))
    for llm in llms.values():
        llm.close()
    return {mode: statistics.median(t[1:]) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    dtypes = ["bfloat16", "float32"]
    parser.add_argument("--dtypes", nargs="+", default=dtypes, choices=dtypes)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        f"batch-1 decode, {args.tokens} tokens, {args.threads} thread(s); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':11s} {'dtype':9s} {'fused ms':>9s} {'tok/s':>7s} {'reference ms':>13s} {'tok/s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tiny-draft": ASSETS / "tiny-draft", "tiny-moe": ASSETS / "tiny-moe"}
        for dtype in args.dtypes:
            paths["llama-5m"] = make_tiny_model(
                Path(tmp) / f"llama-5m-{dtype}", arch="llama", seed=0, dtype=dtype, **MODELS["llama-5m"]
            )
            for name, path in paths.items():
                ms = measure(path, dtype, args)
                print(
                    f"{name:11s} {dtype:9s} {ms['fused']:9.3f} {1e3 / ms['fused']:7.0f} "
                    f"{ms['reference']:13.3f} {1e3 / ms['reference']:7.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
