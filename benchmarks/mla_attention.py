"""Decode attention at DeepSeek-V3's MLA shape through the native Meta-Attention op.

128 query heads over one latent row per token (kv_lora_rank 512 + rope 64 = 576 wide, bfloat16, a one-part
paged cache), beside a yardstick: the same maths as two float32 torch matmuls per sequence over contiguous
rows (no paging). Then MLA's two forms (models/layers/mla.py), absorbed (the op over 576-wide latent rows)
against expanded (kv_b_proj per head, 192-wide scores), timed in turns: prompt chunks of --prefill rows, and
--seqs one-token decodes over --decode cached rows, with --heads query heads (16: DeepSeek-V2-Lite). Prints
milliseconds per layer call and the form this machine's FormCosts pick; --write-profile fits FormCosts to
the timings (non-negative least squares per form) and writes them where the engine reads them.
Run: `python benchmarks/mla_attention.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

from meshserve.atomic import write_atomic
from meshserve.engine.runner import batch_metadata
from meshserve.kernels import native
from meshserve.kernels.attention_tiles import plan_tasks_native, profile_key, tile_sizes
from meshserve.kernels.meta_attention_native import meta_attention
from meshserve.models.config import ModelConfig
from meshserve.models.layers.attention import StepInputs
from meshserve.models.layers.mla import (
    FormCosts,
    LatentAttention,
    MLAConfig,
    expanded_prefill,
    form_costs,
    form_terms,
    user_profile_path,
)

HEADS, WIDTH, BLOCK = 128, 576, 16
LATENT, ROPE, NOPE, V = 512, 64, 128, 128  # DeepSeek-V3's MLA


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def best_pair_ms(first, second, repeats: int) -> tuple[float, float]:
    """Best milliseconds of two functions timed in turns, so a load that comes and goes hits both alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]) * 1e3, min(times[1]) * 1e3


def measure(seqs: int, context: int, threads: int, repeats: int) -> tuple[float, float]:
    """(native op, yardstick) milliseconds for `seqs` decodes over `context` cached tokens each."""
    gen = torch.Generator().manual_seed(0)
    per_seq = -(-(context + 1) // BLOCK)
    tables = np.random.default_rng(0).permutation(seqs * per_seq).reshape(seqs, per_seq).tolist()
    ones = np.ones(seqs, dtype=np.int64)
    meta = batch_metadata(np.full(seqs, context), ones, ones, tables, BLOCK)
    cache = torch.randn(1, seqs * per_seq, BLOCK, 1, WIDTH, generator=gen).bfloat16()
    q = torch.randn(seqs, HEADS, WIDTH, generator=gen).bfloat16()
    k = torch.randn(seqs, 1, WIDTH, generator=gen).bfloat16()
    table = plan_tasks_native(meta, HEADS, 1, tile_sizes(WIDTH, torch.bfloat16), threads)
    scale = WIDTH**-0.5
    rows, qf = torch.randn(seqs, context + 1, WIDTH, generator=gen), q.float()

    def yardstick() -> None:
        for s in range(seqs):
            torch.softmax(qf[s] @ rows[s].T * scale, -1) @ rows[s]

    op = best_ms(lambda: meta_attention(q, k, k, cache, table, scale), repeats)
    return op, best_ms(yardstick, repeats)


def measure_forms(
    heads: int, cached: int, rows: int, seqs: int, threads: int, repeats: int
) -> tuple[float, float, bool, tuple[int, ...]]:
    """(absorbed ms, expanded ms, whether this machine's FormCosts pick expanded, the four cost terms'
    multiply-adds over all heads) of one MLA layer's attention for `seqs`
    sequences each running `rows` new rows after `cached` cached ones: from the projected query and latent
    rows to the per-head outputs (the projections around it are the same for both forms). A prompt chunk is
    cached 0; decodes are rows 1."""
    mla = MLAConfig(None, LATENT, NOPE, ROPE, V, True, (NOPE + ROPE) ** -0.5)
    cfg = ModelConfig(
        "bench", "DeepseekV3ForCausalLM", 8, 64, 1, heads, 1, WIDTH, 1 << 20, 1, [2], torch.bfloat16
    )
    cfg.mla = mla
    layer = LatentAttention(cfg).bfloat16()
    gen = torch.Generator().manual_seed(0)
    layer.kv_b_proj.weight.data = (torch.randn(heads * (NOPE + V), LATENT, generator=gen) * 0.05).bfloat16()
    per_seq = -(-(cached + rows) // BLOCK)
    tables = np.arange(seqs * per_seq).reshape(seqs, per_seq).tolist()
    n = np.full(seqs, rows)
    meta = batch_metadata(np.full(seqs, cached), n, np.ones(seqs, dtype=np.int64), tables, BLOCK)
    cache = torch.randn(1, seqs * per_seq, BLOCK, 1, WIDTH, generator=gen).bfloat16()
    table = plan_tasks_native(meta, heads, 1, tile_sizes(WIDTH, torch.bfloat16), threads)
    step = StepInputs(torch.empty(0), torch.empty(0), {None: table}, None, meta)
    q = torch.randn(seqs * rows, heads, NOPE + ROPE, generator=gen).bfloat16()
    key = torch.randn(seqs * rows, WIDTH, generator=gen).bfloat16()
    absorbed, expanded = best_pair_ms(
        lambda: layer._absorbed(q[..., :NOPE], q[..., NOPE:], key, cache, step),
        lambda: layer._expanded(q, key, cache, meta),
        repeats,
    )
    picks = expanded_prefill(meta, mla, form_costs(WIDTH, torch.bfloat16))
    return absorbed, expanded, picks, tuple(heads * t for t in form_terms(meta, mla))


def fit_costs(terms: list[tuple[int, ...]], times: list[tuple[float, float]]) -> FormCosts:
    """Each form's two weights (ns per multiply-add) by non-negative least squares over the timed cases."""
    a, ms = np.asarray(terms, dtype=np.float64), np.asarray(times) * 1e6
    absorbed, expanded = nnls(a[:, :2], ms[:, 0])[0], nnls(a[:, 2:], ms[:, 1])[0]
    return FormCosts(*absorbed.tolist(), *expanded.tolist())


def write_profile(path: Path, costs: FormCosts, cases: list[dict]) -> None:
    """Merge this machine's fit (with the timings it came from) into the profile at `path`."""
    data = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    data["entries"][profile_key(WIDTH, torch.bfloat16)] = {**asdict(costs), "measured": cases}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heads", type=int, default=HEADS, help="query heads of the forms' layer")
    parser.add_argument("--prefill", type=int, nargs="*", default=[512], help="prompt chunk rows")
    parser.add_argument("--decode", type=int, nargs="*", default=[], help="cached rows of form decodes")
    parser.add_argument(
        "--write-profile",
        nargs="?",
        const=user_profile_path(),
        type=Path,
        help="fit the forms' FormCosts to these timings and write them (default: this machine's profile)",
    )
    args = parser.parse_args()
    if not native.load():
        raise SystemExit(f"native kernels missing: run `{native.BUILD_COMMAND}`")
    torch.set_num_threads(args.threads)
    for seqs in args.seqs:
        op, ref = measure(seqs, args.context, args.threads, args.repeats)
        print(
            f"context {args.context}, {seqs} decode(s), {args.threads} threads: native op {op:.2f} ms, "
            f"torch float32 matmuls {ref:.2f} ms"
        )
    repeats = max(3, args.repeats // 4)
    cases = [("prefill", 0, rows, 1) for rows in args.prefill]
    cases += [("decode", cached, 1, seqs) for cached in args.decode for seqs in args.seqs]
    terms, times, measured = [], [], []
    for phase, cached, rows, seqs in cases:
        absorbed, expanded, picks, cost_terms = measure_forms(
            args.heads, cached, rows, seqs, args.threads, repeats
        )
        what = f"prefill of {rows} rows" if phase == "prefill" else f"{seqs} decode(s) over {cached} rows"
        print(
            f"{what}, {args.heads} heads, {args.threads} threads: absorbed {absorbed:.2f} ms, expanded "
            f"{expanded:.2f} ms (absorbed / expanded {absorbed / expanded:.2f}x; this machine's costs pick "
            f"{'expanded' if picks else 'absorbed'})"
        )
        terms.append(cost_terms)
        times.append((absorbed, expanded))
        measured.append(
            {"heads": args.heads, "cached": cached, "rows": rows, "seqs": seqs, "ms": [absorbed, expanded]}
        )
    if args.write_profile is not None and terms:
        costs = fit_costs(terms, times)
        write_profile(args.write_profile, costs, measured)
        print(f"fitted {costs} -> {args.write_profile}")


if __name__ == "__main__":
    main()
