"""MoE-block section of benchmarks/kernels.py: the fused native op vs meshserve's torch path vs a per-expert
F.linear loop (what transformers' Mixtral block runs), on the 80M Mixtral's block (hidden 512, 8 experts
of intermediate 704, top-2) over token counts 1..512, with a softmax top-k router on random weights.

- fused: the native op (kernels/csrc/moe.cpp) as a prepared SparseMoE runs it;
- torch: the SparseMoE torch path (zero-filled [E, capacity, H] pack, two bmm's through the GEMM table's
  choices, scatter back, weighted sum), what the engine ran before the fused op;
- hf-loop: one gather, two F.linear and an index_add_ per hit expert;
- brgemm (bfloat16): the native op's AMX path (oneDNN's brgemm micro-kernel), forced at every step size
  whatever the CPU (on a CPU without AMX oneDNN runs it on AVX-512); "fused" takes it from
  profiles/moe.json's brgemm_min_tokens for this ISA on, so compare against MESHSERVE_AMX=off / a CPU
  whose tag that file does not list for the plain FMA-tile figures.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from throughput import MODELS

from meshserve.kernels import fused_moe as fused_moe_module
from meshserve.kernels import native
from meshserve.kernels.profile import bmm_key, load_gemm_table
from meshserve.models.layers.moe import SparseMoE

MIXTRAL = MODELS["mixtral"]
TOKENS = (1, 4, 16, 64, 128, 256, 512)


def hf_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """transformers' MixtralSparseMoeBlock: a Python loop over the experts that got tokens."""
    weights, experts = moe.route(x)
    out = torch.zeros(x.shape, dtype=torch.float32)
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    for e in torch.unique(experts).tolist():
        token, choice = torch.where(experts == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])
        out.index_add_(0, token, y.float() * weights[token, choice, None].float())
    return out.to(x.dtype)


def forced_brgemm(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The prepared block with the fused op's brgemm path forced on (what an AMX machine runs)."""
    with mock.patch.object(fused_moe_module, "brgemm_min_tokens", lambda: 1):
        return moe(x)


def make_blocks(dtype: torch.dtype, budget: int) -> tuple[SparseMoE, SparseMoE]:
    """The same random block twice: prepared for the fused op, and for the torch path."""
    gen = torch.Generator().manual_seed(0)
    h, i, e = MIXTRAL["hidden_size"], MIXTRAL["intermediate_size"], MIXTRAL["num_local_experts"]
    moe = SparseMoE(h, i, e, MIXTRAL["num_experts_per_tok"], renormalize=True, weights_in_model_dtype=False)
    for p in moe.parameters():
        p.data = (torch.randn(p.shape, generator=gen) * 0.05).to(dtype)
    moe.experts.transposed_layout()  # as the loader leaves them
    torch_path = copy.deepcopy(moe)
    table = load_gemm_table()
    choices = [
        table.by_m(bmm_key(*w.shape), dtype, budget)
        for w in (moe.experts.gate_up_proj, moe.experts.down_proj)
    ]
    moe.experts.prepare(*choices, fused=True)
    torch_path.experts.prepare(*choices, fused=False)
    return moe, torch_path


@torch.inference_mode()
def moe_section(dtypes: list[str], threads: list[int], repeats: int, budget: int = 512) -> None:
    """Per-call ms of each method per token count, and the fused op's speed-up."""
    assert native.load(), f"build the native kernels first: {native.BUILD_COMMAND}"
    print(
        f"\n== MoE block: the 80M Mixtral's (hidden {MIXTRAL['hidden_size']}, "
        f"{MIXTRAL['num_local_experts']} experts x {MIXTRAL['intermediate_size']}, top-"
        f"{MIXTRAL['num_experts_per_tok']}), median of {repeats} interleaved runs, ms per call =="
    )
    print(
        f"{'dtype':9s} {'thr':>3s} {'tokens':>6s} {'fused':>8s} {'torch':>8s} {'hf-loop':>8s}  "
        f"{'vs torch':>8s} {'vs loop':>8s}"
    )
    for dtype_name, n_threads in itertools.product(dtypes, threads):
        torch.set_num_threads(n_threads)
        dtype = getattr(torch, dtype_name)
        fused, torch_path = make_blocks(dtype, budget)
        methods = {"fused": fused, "torch": torch_path, "hf-loop": lambda x, m=torch_path: hf_loop(m, x)}
        if dtype == torch.bfloat16:
            methods["brgemm"] = lambda x, m=fused: forced_brgemm(m, x)
        gains = []
        for t in TOKENS:
            x = torch.randn(t, MIXTRAL["hidden_size"], generator=torch.Generator().manual_seed(t)).to(dtype)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            for fn in methods.values():  # warm-up, and every method agrees
                torch.testing.assert_close(fn(x), methods["torch"](x), atol=tol, rtol=tol)
            runs: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(repeats):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn(x)
                    runs[name].append(time.perf_counter() - start)
            ms = {m: statistics.median(r) * 1e3 for m, r in runs.items()}
            gains.append(ms["torch"] / ms["fused"])
            fused_ms = ms["fused"]
            brgemm = f"  brgemm {ms['brgemm']:8.3f}" if "brgemm" in ms else ""
            print(
                f"{dtype_name:9s} {n_threads:3d} {t:6d} {fused_ms:8.3f} {ms['torch']:8.3f} "
                f"{ms['hf-loop']:8.3f}  {ms['torch'] / fused_ms:7.2f}x {ms['hf-loop'] / fused_ms:7.2f}x"
                + brgemm,
                flush=True,
            )
        print(
            f"fused vs torch path, {dtype_name}, {n_threads} thread(s): "
            f"median {statistics.median(gains):.2f}x over token counts"
        )
