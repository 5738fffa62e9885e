"""Prefill/decode disaggregation on this machine: mixed (one engine) vs 1 prefill + 1 decode process.

    flock /tmp/bench.lock .venv/bin/python benchmarks/pd.py [--requests 16] [--rate 2] [--small]
        [--pd prefill=1,decode=1 --pd prefill=2,decode=1 ...] [--no-flip]

Open-loop load: requests arrive at ``--rate`` per second (seeded Poisson), each streamed, under two mixes at
the same rate: prompt-heavy (long prompts, few output tokens) and decode-heavy (short prompts, many output
tokens). Prints TTFT and TPOT (mean, p99) per arrangement, the KV transfer bytes and latency per request
(1P+1D), and, for a load whose mix flips from prompt-heavy to decode-heavy half way, the TPOT p99 of the
requests before and after the prefill instance switches to mixed at the flip (POST /admin/role's switch,
here called directly), beside the same load with no switch. The mixed engine runs with all cores' threads
and with one (what each instance of the pair gets: the cores are split, torch.set_num_threads per process).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from throughput import LLAMA  # benchmarks run as scripts: their folder is on sys.path

from meshserve.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.pd.frontend import PDEngine
from meshserve.engine.sampling_params import SamplingParams
from meshserve.testing import make_tiny_model

SMALL = {
    **LLAMA,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
}
ENGINE = {"max_num_batched_tokens": 256, "max_num_seqs": 16, "block_size": 16, "max_model_len": 1024}
MIXES = {"prompt-heavy": (384, 8), "decode-heavy": (16, 48)}  # (prompt tokens, output tokens)


def workload(mixes: list[str], n: int, rate: float, vocab: int, seed: int) -> list[dict[str, Any]]:
    """``n`` requests per mix in turn, arriving at ``rate`` per second (exponential gaps)."""
    rng = np.random.default_rng(seed)
    at, out = 0.0, []
    for mix in mixes:
        prompt_len, max_tokens = MIXES[mix]
        for _ in range(n):
            at += rng.exponential(1 / rate)
            prompt = rng.integers(3, vocab, prompt_len).tolist()
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            out.append({"at": at, "prompt": prompt, "params": params, "mix": mix})
    return out


def drive(engine: Any, load: list[dict[str, Any]], switch_at: int | None = None) -> list[dict[str, float]]:
    """Send ``load`` open-loop through ``engine`` (an Engine or a PDEngine), streaming; per request its
    arrival, TTFT and TPOT. ``switch_at``: when that request arrives, the prefill instance turns mixed."""
    start, sent, times = time.monotonic(), 0, {}
    while sent < len(load) or engine.has_unfinished():
        now = time.monotonic() - start
        while sent < len(load) and load[sent]["at"] <= now:
            if switch_at == sent:
                engine.set_role("prefill", "mixed")
            r = load[sent]
            engine.add_request(r["prompt"], r["params"], str(sent), stream=True)
            times[str(sent)] = [start + r["at"]]
            sent += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, load[sent]["at"] - now))
            continue
        for out in engine.step():
            stamp = time.monotonic()
            times[out.request_id] += [stamp] * len(out.outputs[0].token_ids)
    rows = []
    for i in range(len(load)):
        arrival, *tokens = times[str(i)]
        tpot = (tokens[-1] - tokens[0]) / (len(tokens) - 1) if len(tokens) > 1 else float("nan")
        rows.append({"arrival": arrival - start, "ttft": tokens[0] - arrival, "tpot": tpot})
    return rows


def received(pd: PDEngine) -> list[dict[str, float]]:
    """Each decode instance's transfer counters (warm-up included: take differences)."""
    stats = pd.stats()
    return [stats[name]["transfer"] for name in pd.decoders]


def arrangement(spec: str) -> str:
    """ "prefill=2,decode=1" as "2P+1D"."""
    counts = dict(part.split("=") for part in spec.split(","))
    return f"{counts['prefill']}P+{counts['decode']}D"


def summary(rows: list[dict[str, float]]) -> str:
    ttft = np.array([r["ttft"] for r in rows]) * 1e3
    tpot = np.array([r["tpot"] for r in rows if r["tpot"] == r["tpot"]]) * 1e3
    return (
        f"TTFT mean {ttft.mean():7.1f} p99 {np.percentile(ttft, 99):7.1f} ms | "
        f"TPOT mean {tpot.mean():6.1f} p99 {np.percentile(tpot, 99):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests per mix")
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 128-wide model (a quick check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pd",
        action="append",
        help="arrangements to run beside mixed, e.g. --pd prefill=1,decode=1 --pd prefill=2,decode=1 "
        "(default: 1P+1D); the flipping mix runs on 1P+1D",
    )
    parser.add_argument("--no-flip", action="store_true", help="skip the flipping mix")
    args = parser.parse_args()
    arrangements = args.pd or ["prefill=1,decode=1"]
    shape = SMALL if args.small else LLAMA
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(Path(tmp) / "llama", **shape))
        config = EngineConfig.from_args(model, **ENGINE)
        print(
            f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.requests} requests/mix at "
            f"{args.rate}/s, model {'small' if args.small else 'llama ~28M'}"
        )
        for mix in MIXES:
            load = workload([mix], args.requests, args.rate, shape["vocab_size"], args.seed)
            for threads in sorted(
                {config.num_threads, 1}, reverse=True
            ):  # all cores, and one as each instance
                engine = Engine(dataclasses.replace(config, num_threads=threads))
                drive(engine, load[:2])  # warm-up: kernels, first allocations
                print(f"{mix:13s} mixed, {threads} thread(s) {summary(drive(engine, load))}")
                engine.close()
            for spec in arrangements:
                with PDEngine(EngineConfig.from_args(model, pd=spec, **ENGINE)) as pd:
                    drive(pd, load[:2])
                    before = received(pd)
                    rows = drive(pd, load)
                    after = received(pd)
                    n = sum(a["transfers"] - b["transfers"] for a, b in zip(after, before, strict=True))
                    per = sum(a["bytes"] - b["bytes"] for a, b in zip(after, before, strict=True)) / max(n, 1)
                    mean = sum(a["seconds"] for a in after) / max(sum(a["transfers"] for a in after), 1)
                    p99 = max(a.get("latency_p99_s", 0.0) for a in after)
                    name = arrangement(spec)
                    print(
                        f"{mix:13s} {name:6s} {summary(rows)} | KV {per / 1024:.0f} KiB/request, "
                        f"transfer mean {mean * 1e3:.1f} p99 {p99 * 1e3:.1f} ms (p99: the worst instance's)"
                    )
        flip = workload(list(MIXES), args.requests, args.rate, shape["vocab_size"], args.seed + 1)
        for switch in () if args.no_flip else (None, args.requests):
            with PDEngine(EngineConfig.from_args(model, pd="prefill=1,decode=1", **ENGINE)) as pd:
                drive(pd, flip[:2])
                rows = drive(pd, flip, switch_at=switch)
            first, second = rows[: args.requests], rows[args.requests :]
            p99 = [np.nanpercentile([r["tpot"] for r in part], 99) * 1e3 for part in (first, second)]
            label = "switch to mixed at the flip" if switch is not None else "no switch"
            print(
                f"flip 1P+1D, {label:27s}: TPOT p99 prompt-heavy half {p99[0]:6.1f} ms, "
                f"decode-heavy half {p99[1]:6.1f} ms"
            )
        print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
