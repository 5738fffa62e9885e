"""Structured outputs: decode tok/s with and without a JSON-schema constraint; the grammar's cost per token.

    .venv/bin/python benchmarks/structured.py [--requests 8] [--max-tokens 96] [--repeats 3] [--threads 1]

Model: the ~28M Llama of benchmarks/throughput.py (random weights, 4,096-token byte-level BPE). A batch of
--requests sampled requests with a nested JSON schema (objects, arrays, enums, patterns) runs first; the
unconstrained run then gives each request exactly as many output tokens as its constrained twin had
(ignore_eos, max_tokens per request), so both runs decode the same batch shapes and the difference is the
grammar's. Runs alternate within each repeat and the fastest repeat is kept. Then the constrained outputs
are replayed into fresh matchers to time the grammar library alone per token: xgrammar's bitmask fill plus
accept, applying the batch mask per row, and llguidance's fill plus consume when it is installed (the
comparison that picked xgrammar, docs/engine.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from throughput import LLAMA

from meshserve.engine import LLM, SamplingParams
from meshserve.engine.grammar import apply_bitmask, decode_bitmask, words
from meshserve.engine.structured_params import StructuredOutputsParams
from meshserve.testing import make_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[a-z0-9]{4,12}$"},
        "status": {"enum": ["open", "closed", "pending"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "maxItems": 6,
        },
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                "admin": {"type": "boolean"},
            },
            "required": ["name", "admin"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["id", "status", "scores", "owner"],
    "additionalProperties": False,
}


def timed(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[float, float, list[list[int]]]:
    """Wall-clock and process CPU seconds, and each request's output tokens."""
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, time.process_time() - cpu, [o.outputs[0].token_ids for o in outs]


def mask_cost(llm: LLM, spec: StructuredOutputsParams, outputs: list[list[int]]) -> dict[str, float]:
    """Microseconds per token: xgrammar fill + accept, the batch mask per row, llguidance fill + consume."""
    vocab = llm.engine.model_config.vocab_size
    grammars = llm.engine.grammars
    tokens = sum(map(len, outputs))
    matchers = [grammars.matcher(spec) for _ in outputs]
    start = time.perf_counter()
    bitmask = torch.full((1, words(vocab)), -1, dtype=torch.int32)
    for m, out in zip(matchers, outputs, strict=True):
        for t in out:
            m.fill_next_token_bitmask(bitmask, 0)
            m.accept_token(t)
    result = {"xgrammar_us": (time.perf_counter() - start) / tokens * 1e6}
    rows = torch.randn(len(outputs), vocab)
    masks = decode_bitmask([grammars.matcher(spec) for _ in outputs], vocab)
    copies = [rows.clone() for _ in range(200)]
    start, reps = time.perf_counter(), len(copies)
    for copy in copies:
        apply_bitmask(copy, masks)
    result["apply_mask_us_per_row"] = (time.perf_counter() - start) / reps / len(outputs) * 1e6
    try:
        import llguidance
        import llguidance.torch as lgt
    except ImportError:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.json"
        file.write_text(llm.engine.tokenizer.backend.to_str())
        lt = llguidance.LLTokenizer(str(file))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        spec.json, defaults={"whitespace_flexible": not spec.disable_any_whitespace}
    )
    bitmask = lgt.allocate_token_bitmask(1, lt.vocab_size)
    start = time.perf_counter()
    for out in outputs:
        m = llguidance.LLMatcher(lt, grammar)
        for t in out:
            lgt.fill_next_token_bitmask(m, bitmask, 0)
            m.consume_token(t)
    result["llguidance_us"] = (time.perf_counter() - start) / tokens * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(3, LLAMA["vocab_size"], (32,), generator=gen).tolist() for _ in range(args.requests)
    ]
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "llama", arch="llama", seed=args.seed, **LLAMA)
        llm = LLM(str(path), max_model_len=512, max_num_seqs=args.requests, num_threads=args.threads)
        constrained = [
            SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, structured_outputs=spec)
            for i in range(args.requests)
        ]
        llm.generate(prompts[:1], constrained[:1], use_tqdm=False)  # warm-up: compile, first steps
        wall = {"json_schema": float("inf"), "none": float("inf")}
        cpu = dict(wall)
        outputs: list[list[int]] = []
        for _ in range(args.repeats):
            seconds, used, outputs = timed(llm, prompts, constrained)
            wall["json_schema"], cpu["json_schema"] = (
                min(wall["json_schema"], seconds),
                min(cpu["json_schema"], used),
            )
            free = [
                SamplingParams(temperature=1.0, seed=i, max_tokens=len(o), ignore_eos=True)
                for i, o in enumerate(outputs)
            ]
            seconds, used, plain = timed(llm, prompts, free)
            assert list(map(len, plain)) == list(map(len, outputs))
            wall["none"], cpu["none"] = min(wall["none"], seconds), min(cpu["none"], used)
        tokens = sum(map(len, outputs))
        valid = sum(1 for o in outputs if _parses(llm, o))
        print(f"{args.requests} requests, {tokens} output tokens ({valid} complete JSON documents)")
        for name in wall:
            print(
                f"  {name:12s} {tokens / wall[name]:8.1f} tok/s  {cpu[name] / tokens * 1e3:7.3f} cpu ms/tok"
            )
        print(f"  overhead     {(wall['json_schema'] / wall['none'] - 1) * 100:8.1f} % wall", end="")
        print(f"  {(cpu['json_schema'] / cpu['none'] - 1) * 100:6.1f} % cpu")
        for name, value in mask_cost(llm, spec, outputs).items():
            print(f"  {name:24s} {value:8.2f} us")


def _parses(llm: LLM, tokens: list[int]) -> bool:
    try:
        json.loads(llm.engine.tokenizer.decode(tokens))
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
