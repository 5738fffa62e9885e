"""Speculative decoding: speedup and acceptance of n-gram and draft-model proposers vs no speculation.

    .venv/bin/python benchmarks/spec.py [--requests 64] [--k 4] [--small]

Two workloads, greedy, ignore_eos, seeded:
- repetitive: each prompt is a seed text, the target's own continuation of it, and the seed text again,
  so the output may repeat text found in the prompt (what prompt lookup is for: editing, quoting, RAG);
  how often a random model really repeats it shows in the acceptance rate;
- random: the standard workload (prompt lengths uniform 32-512, outputs 16-128, random token ids).
The draft model keeps the target's first layers (layer skipping), so it shares tokenizer and head. In a
random model every layer rewrites the residual stream, so a layer-skipped draft would almost never agree;
trained deep models refine in their upper layers instead, which ``--upper-scale`` imitates by scaling the
output projections (o_proj, down_proj) of the layers the draft skips (1.0 = the raw random model).
Every run must give the same tokens as the run without speculation (greedy verification is exact).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from throughput import LLAMA, standard_workload  # benchmarks run as scripts: their folder is on sys.path
from tqdm.auto import tqdm

from meshserve.atomic import atomic_path
from meshserve.engine.llm import LLM
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.spec.layer_skip import write_layer_skip_draft
from meshserve.testing import make_tiny_model

MODEL = LLAMA  # the standard tiny Llama of benchmarks/throughput.py (~28M parameters)
SMALL = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 256, "vocab_size": 4096, "max_position_embeddings": 2048}


def random_workload(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """The standard workload of benchmarks/throughput.py, greedy."""
    prompts, lengths = standard_workload(n, vocab, seed)
    return prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]


def repetitive_workload(llm: LLM, n: int, vocab: int,
                        seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Seed text + the target's greedy continuation of it + the seed text again."""
    rng = np.random.default_rng(seed + 1)
    seeds = [rng.integers(3, vocab, int(rng.integers(16, 65))).tolist() for _ in range(n)]
    lengths = [int(rng.integers(32, 129)) for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]
    firsts = llm.generate(seeds, params, use_tqdm=False)
    return [s + f.outputs[0].token_ids + s for s, f in zip(seeds, firsts, strict=True)], params


def scale_upper_layers(path: Path, first: int, scale: float) -> None:
    """Multiply o_proj and down_proj weights of layers >= ``first`` by ``scale`` (in place, atomically)."""
    if scale == 1.0:
        return
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        for name, tensor in tensors.items():
            match = re.search(r"\.layers\.(\d+)\.", name)
            output = name.endswith(("o_proj.weight", "down_proj.weight"))
            if match and int(match.group(1)) >= first and output:
                tensors[name] = tensor * scale
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    engine, spec = llm.engine, llm.engine.spec
    before = spec.counters() if spec is not None else {}
    steps, computed, outs = engine.num_steps, 0, {}
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    with tqdm(total=len(ids), desc="generate", unit="req") as bar:
        while engine.has_unfinished():
            for out in engine.step():
                outs[out.request_id] = out.token_ids
                bar.update(1)
            computed += sum(engine.last_stats["tokens"].values())
    seconds = time.perf_counter() - start
    after = spec.counters() if spec is not None else {}
    drafts = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
    accepted = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    verifies = after.get("verify_steps", 0) - before.get("verify_steps", 0)
    tokens = [outs[i] for i in ids]
    # Steps and forward tokens do not depend on how busy the machine is: fewer steps is what speculation
    # buys when a step is latency-bound; more forward tokens per output token is what it costs.
    return {"out_tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "tokens": tokens,
            "steps": engine.num_steps - steps, "fwd_per_out": computed / sum(map(len, tokens)),
            "acceptance": accepted / drafts if drafts else 0.0,
            "mean_len": (accepted + verifies) / verifies if verifies else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--upper-scale", type=float, default=0.3,
                        help="scale of the skipped layers' output projections (1 = raw random model)")
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--small", action="store_true", help="a 4-layer model (quick check)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = SMALL if args.small else MODEL
    with tempfile.TemporaryDirectory() as tmp:
        target = make_tiny_model(Path(tmp) / "target", arch="llama", seed=args.seed, dtype=args.dtype, **cfg)
        scale_upper_layers(target, args.draft_layers, args.upper_scale)
        draft = write_layer_skip_draft(target, Path(tmp) / "draft", args.draft_layers)
        common = {"max_num_batched_tokens": args.budget, "max_num_seqs": 64, "dtype": args.dtype}
        setups = {
            "none": {},
            "ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": args.k,
                                             "prompt_lookup_max": 4, "prompt_lookup_min": 2}},
            "draft": {"speculative_config": {"method": "draft_model", "num_speculative_tokens": args.k,
                                             "model": str(draft)}},
        }
        vocab = cfg["vocab_size"]
        plain = LLM(str(target), **common)
        workloads = {"repetitive": repetitive_workload(plain, args.requests, vocab, args.seed),
                     "random": random_workload(args.requests, vocab, args.seed)}
        results: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):  # settings alternate, so a busy machine skews the ratios less
            for w in workloads:
                for name, extra in setups.items():  # a fresh engine per run: no prefix cache carried over
                    r = run(LLM(str(target), **common, **extra), *workloads[w])
                    if (w, name) not in results or r["seconds"] < results[(w, name)]["seconds"]:
                        results[(w, name)] = r
    print(f"\nspeculative decoding: {args.requests} requests, k={args.k}, draft = first {args.draft_layers} "
          f"of {cfg['num_hidden_layers']} layers (upper layers' output scaled by {args.upper_scale}), "
          f"llama h{cfg['hidden_size']} {args.dtype}, budget {args.budget}")
    print(f"{'workload':<11} {'method':<6} {'out tok/s':>10} {'speedup':>8} {'steps':>6} {'fwd/out':>8} "
          f"{'accept':>7} {'mean len':>9} {'exact':>6}")
    for w in workloads:
        base = results[(w, "none")]
        for name in setups:
            r = results[(w, name)]
            print(f"{w:<11} {name:<6} {r['out_tok_s']:10.1f} {r['out_tok_s'] / base['out_tok_s']:7.2f}x "
                  f"{r['steps']:6d} {r['fwd_per_out']:8.2f} {r['acceptance']:7.1%} {r['mean_len']:9.2f} "
                  f"{str(r['tokens'] == base['tokens']):>6}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
