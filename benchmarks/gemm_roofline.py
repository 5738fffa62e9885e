"""Roofline account of the race's GEMMs and MoE op (kernels.py --sections gemm-roofline).

    flock /tmp/meshserve-bench.lock .venv/bin/python benchmarks/kernels.py --sections gemm-roofline \
        [--dtypes bfloat16] [--threads 2] [--repeats 3] [--archs llama mixtral]

The race's workload (benchmarks/throughput.py: 64 requests, token budget 512, max_num_seqs 64) runs once
through the engine per model, recording every step's token count M, the rows the LM head sees and each
MoE layer's tokens per expert. Then each linear layer (as the engine prepared it: the GEMM table's kernel
for that M) and the fused MoE op (on a step's recorded expert counts, layers in turn) are timed at every
recorded step and summed: FLOPs, bytes (weights as the kernel reads them: bfloat16 pairs, or the float32
copy for packed_f32; plus activations in and out), achieved GFLOP/s and GB/s against this box's roofs,
and each row's share of the recorded run's wall time (calls timed best of --repeats). Roofs, measured
here and now: the float32 FMA rate (benchmarks/isa_rate.cpp, per core, times threads) and read bandwidth
over a buffer the size of the model's weights (they fit this CPU's L3: the bandwidth a weight read sees).
"""

from __future__ import annotations

import collections
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from probes import fma_gflops, run_probe
from throughput import MODELS, standard_workload

from meshserve.engine import LLM, SamplingParams
from meshserve.kernels.fused_moe import fused_moe, fused_route
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.layers.moe import SparseMoE
from meshserve.testing import make_tiny_model

PER_EXPERT = (2, 8, 16, 32, 64, 128)  # per-expert token counts of the MoE op's own sweep


def fma_peak_per_core() -> float:
    """GFLOP/s of float32 FMAs on one core (isa_rate.cpp, compiled here); 0 when it cannot be built."""
    try:
        return fma_gflops(run_probe("isa_rate"))
    except subprocess.CalledProcessError:
        return 0.0


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """GB/s of a summing read over nbytes of float32 (best of repeats) at torch's thread count."""
    buf = torch.ones(max(nbytes // 4, 1 << 20))
    buf.sum()
    best = min(_seconds(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def record_race(arch: str, dtype: str, threads: int, tmp: Path) -> tuple[LLM, dict[str, list], float]:
    """Run the race's workload once; the engine (for its prepared layers), the recorded shapes, wall s."""
    path = make_tiny_model(tmp / arch, arch=arch, dtype=dtype, **MODELS[arch])
    llm = LLM(
        str(path),
        dtype=dtype,
        max_num_batched_tokens=512,
        max_num_seqs=64,
        kv_cache_memory=1.0,
        num_threads=threads,
    )
    model = llm.engine.model
    rec: dict[str, list] = {"m": [], "head": [], "counts": []}
    model.register_forward_pre_hook(lambda _m, args: rec["m"].append(args[1].num_tokens))
    model.lm_head.register_forward_pre_hook(lambda _m, args: rec["head"].append(args[0].shape[0]))
    prompts, outputs = standard_workload()
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up, not recorded
    for v in rec.values():
        v.clear()
    moe = [m for m in model.modules() if isinstance(m, SparseMoE)]
    start = time.perf_counter()
    if moe:
        model.register_forward_hook(
            lambda *_: rec["counts"].append(torch.stack([m.last_counts.clone() for m in moe]))
        )
    llm.generate(prompts, params, use_tqdm=True)
    return llm, rec, time.perf_counter() - start


def ids_for_counts(counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert ids [T, k] with these per-expert counts, each token's k ids distinct (no expert holds more
    than T pairs, so token t's pairs t, T + t, ... of the expert-sorted list are different experts)."""
    sorted_ids = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return sorted_ids.view(top_k, -1).T.contiguous()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Best of repeats after a warm-up: on a shared 2-core box a 2-thread call that loses a core to another
    process waits a whole scheduler slice (~12 ms), which a median of few runs does not always drop."""
    fn()
    return min(_seconds(fn) for _ in range(repeats))


class Row:
    """Sums of one layer kind over the recorded steps."""

    def __init__(self) -> None:
        self.flop = self.bytes = self.seconds = 0.0
        self.kernels: collections.Counter[str] = collections.Counter()
        self.ms: list[int] = []


def linear_row(layer: SmoothLinear, ms: list[int], repeats: int, copies: int) -> Row:
    """One linear layer timed at every recorded M (distinct Ms timed once, weighted by their count)."""
    row = Row()
    n, k = layer.weight.shape
    gen = torch.Generator().manual_seed(0)
    for m, times in collections.Counter(ms).items():
        choice = layer._by_m[min(m, len(layer._by_m) - 1)]
        f32 = layer.wants_f32(m)
        x = torch.randn(m, k, generator=gen).to(layer.weight.dtype)
        x = x.float() if f32 else x
        s = timed(lambda x=x, f32=f32: layer(x, out_f32=f32), repeats)
        w_bytes = 4 if choice.kernel == "packed_f32" else layer.weight.element_size()
        row.flop += times * copies * 2.0 * m * n * k
        row.bytes += times * copies * (n * k * w_bytes + m * k * x.element_size() + m * n * (4 if f32 else 2))
        row.seconds += times * copies * s
        row.kernels[choice.name] += times * copies * s
        row.ms += [m] * times
    return row


def engine_route(moe: SparseMoE, x: torch.Tensor) -> object:
    """The router as the engine runs it: the native one where the fused op serves the layer."""
    if moe.experts.packed is None:
        return moe.route(x)
    return fused_route(x, moe.gate.weight.detach(), moe.top_k, moe.renormalize)


def moe_rows(moe_layers: list[SparseMoE], counts: list[torch.Tensor], repeats: int) -> tuple[Row, Row]:
    """The router (gate, softmax, top-k, counts) and the fused op at every recorded step, layers in turn."""
    router, op = Row(), Row()
    gen = torch.Generator().manual_seed(0)
    first = moe_layers[0]
    h = first.gate.in_features
    e, i_size = first.experts.down_proj.shape[0], first.experts.down_proj.shape[2]
    dtype = first.gate.weight.dtype
    layers = len(moe_layers)
    for step, per_layer in enumerate(counts):  # one layer per step, in turn, standing for all of them
        moe, c = moe_layers[step % layers], per_layer[step % layers]
        t = int(c.sum()) // moe.top_k
        x = torch.randn(t, h, generator=gen).to(dtype)
        ids = ids_for_counts(c, moe.top_k)
        weights = torch.full(ids.shape, 1.0 / moe.top_k)
        router.seconds += layers * timed(lambda moe=moe, x=x: engine_route(moe, x), repeats)
        router.flop += layers * 2.0 * t * h * e
        router.bytes += layers * (e * h * 2 + t * h * 2)
        packed = moe.experts.packed
        op.seconds += layers * timed(lambda x=x, i=ids, w=weights, p=packed: fused_moe(x, i, w, p), repeats)
        op.flop += layers * 2.0 * int(c.sum()) * 3 * h * i_size
        op.bytes += layers * (int((c > 0).sum()) * 3 * h * i_size * 2 + t * h * 2 * 2)
        op.ms.append(t)
    op.kernels["fused_moe"] += op.seconds
    router.kernels["route"] += router.seconds
    return router, op


def print_rows(rows: dict[str, tuple[str, Row]], wall: float, peak: float, bw: float) -> None:
    print(
        f"{'layer':10s} {'N x K':>10s} {'kernels (time share)':34s} {'GFLOP':>7s} {'MB':>8s} {'ms':>8s} "
        f"{'GFLOP/s':>8s} {'%FMA':>5s} {'GB/s':>6s} {'%BW':>5s} {'%wall':>6s}"
    )
    total = 0.0
    for name, (shape, r) in rows.items():
        total += r.seconds
        kernels = ", ".join(f"{k} {v / r.seconds:.0%}" for k, v in r.kernels.most_common(3))
        gflops, gbs = r.flop / r.seconds / 1e9, r.bytes / r.seconds / 1e9
        print(
            f"{name:10s} {shape:>10s} {kernels[:34]:34s} {r.flop / 1e9:7.1f} {r.bytes / 1e6:8.0f} "
            f"{r.seconds * 1e3:8.1f} {gflops:8.1f} {gflops / peak:5.0%} {gbs:6.1f} {gbs / bw:5.0%} "
            f"{r.seconds / wall:6.1%}"
        )
    print(
        f"{'all':10s} {'':>10s} {'':34s} {'':>7s} {'':>8s} {total * 1e3:8.1f} {'':>8s} {'':>5s} {'':>6s} "
        f"{'':>5s} {total / wall:6.1%}"
    )


def moe_sweep(moe: SparseMoE, peak: float, bw: float, repeats: int) -> None:
    """The fused op at even per-expert token counts: GFLOP/s and GB/s per count."""
    e, k = moe.num_experts, moe.top_k
    h, i_size = moe.gate.in_features, moe.experts.down_proj.shape[2]
    print(f"fused MoE op at even loads ({e} experts, top-{k}, hidden {h}, intermediate {i_size}):")
    print(
        f"{'per expert':>10s} {'tokens':>6s} {'ms':>7s} {'GFLOP/s':>8s} {'%FMA':>5s} {'GB/s':>6s} {'%BW':>5s}"
    )
    for per in PER_EXPERT:
        counts = torch.full((e,), per)
        ids = ids_for_counts(counts, k)
        t = ids.shape[0]
        x = torch.randn(t, h, generator=torch.Generator().manual_seed(per)).to(moe.gate.weight.dtype)
        s = timed(
            lambda x=x, ids=ids: fused_moe(x, ids, torch.full(ids.shape, 1.0 / k), moe.experts.packed),
            repeats,
        )
        gflops = 2.0 * per * e * 3 * h * i_size / s / 1e9
        gbs = (e * 3 * h * i_size * 2 + 4 * t * h) / s / 1e9
        print(
            f"{per:10d} {t:6d} {s * 1e3:7.3f} {gflops:8.1f} {gflops / peak:5.0%} {gbs:6.1f} {gbs / bw:5.0%}"
        )


@torch.inference_mode()
def roofline_section(archs: list[str], dtypes: list[str], threads: list[int], repeats: int) -> None:
    """The roofline table of each race model (dtype, threads) from its recorded steps."""
    per_core = fma_peak_per_core()
    for arch, dtype, n_threads in ((a, d, t) for a in archs for d in dtypes for t in threads):
        with tempfile.TemporaryDirectory() as tmp:
            llm, rec, wall = record_race(arch, dtype, n_threads, Path(tmp))
            torch.set_num_threads(n_threads)
            model = llm.engine.model
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            bw = read_bandwidth(weight_bytes)
            peak = per_core * n_threads or float("nan")
            ms = rec["m"]
            q = statistics.quantiles(ms, n=4)
            print(
                f"\n== roofline: {arch} {dtype}, {n_threads} thread(s), the race's workload: {len(ms)} "
                f"steps "
                f"in {wall:.2f} s (recorded run), M min/q1/median/q3/max {min(ms)}/{q[0]:.0f}/{q[1]:.0f}/"
                f"{q[2]:.0f}/{max(ms)}, {sum(m == 512 for m in ms)} full steps; LM head M median "
                f"{statistics.median(rec['head']):.0f}. Roofs: FMA {peak:.0f} GFLOP/s "
                f"(isa_rate.cpp {per_core:.0f}/core), read {bw:.1f} GB/s over {weight_bytes / 1e6:.0f} "
                "MB =="
            )
            layers = model.layers
            n_layers = len(layers)
            attn = layers[0].self_attn
            rows: dict[str, tuple[str, Row]] = {}
            linears = {"qkv": attn.qkv_proj, "o": attn.o_proj}
            if not rec["counts"]:
                linears |= {"gate_up": layers[0].mlp.gate_up_proj, "down": layers[0].mlp.down_proj}
            for name, layer in linears.items():
                n, k = layer.weight.shape
                rows[name] = (f"{n}x{k}", linear_row(layer, ms, repeats, n_layers))
            n, k = model.lm_head.weight.shape
            rows["lm_head"] = (f"{n}x{k}", linear_row(model.lm_head, rec["head"], repeats, 1))
            if rec["counts"]:
                moe = [layer.mlp for layer in layers]
                router, op = moe_rows(moe, rec["counts"], repeats)
                e, h = moe[0].num_experts, moe[0].gate.in_features
                rows["router"] = (f"{e}x{h}", router)
                rows["moe_op"] = (f"{e}x3x{moe[0].experts.down_proj.shape[2]}", op)
            print_rows(rows, wall, peak, bw)
            if rec["counts"]:
                moe_sweep(layers[0].mlp, peak, bw, repeats)
            llm.close()
