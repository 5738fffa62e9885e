"""One resident layout per linear: whatever primitives a table picks per M, a prepared layer holds one layout
of its weight (extra ones only within a byte budget), and every M still equals F.linear."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from meshserve import LLM, SamplingParams
from meshserve.kernels.gemm_layout import layout_bytes, plan_layouts
from meshserve.kernels.profile import GemmTable
from meshserve.kernels.smooth_gemm import GemmChoice, SmoothLinear
from meshserve.models.layers.tied_embedding import TiedEmbedding
from meshserve.models.loader import meta_model
from meshserve.testing import make_tiny_model

TOL = {"atol": 2e-2, "rtol": 1.6e-2}  # bfloat16 output, rounded once
# A table as a noisy profile writes one: five primitives on five layouts over M = 0..64.
ROWS = [(1, "brgemm", 1), (8, "dpbf16", 1), (16, "linear", 1), (32, "packed", 16), (64, "packed_f32", 1)]


def by_m(rows: list[tuple[int, str, int]], max_m: int) -> list[GemmChoice]:
    return [GemmChoice(*next((r[1:] for r in rows if r[0] >= m), rows[-1][1:])) for m in range(max_m + 1)]


def held_bytes(layer: SmoothLinear) -> int:
    """Bytes of every tensor the layer keeps (its parameters unless on meta, and the packed layouts)."""
    packed = (layer._pairs, layer._panels, layer._packed, layer._packed_f32, layer._bias_f32)
    tensors = [p for p in layer.parameters() if not p.is_meta] + [t for t in packed if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def bf16_layer(n: int = 72, k: int = 64) -> SmoothLinear:
    torch.manual_seed(0)
    return SmoothLinear(k, n, bias=True).to(torch.bfloat16)


@pytest.mark.parametrize(("decode_m", "layout"), [(1, "panels"), (8, "pairs"), (16, "pairs")])
def test_a_layer_keeps_one_layout_whatever_its_table_picks(decode_m, layout):
    layer = bf16_layer()
    x = torch.randn(64, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())  # the oracle, before any packing
    choices = by_m(ROWS, 64)
    assert (
        layer.kept_bytes(choices, decode_m)
        == layout_bytes(layout, 72, 64, torch.bfloat16, True) - 72 * 64 * 2
    )
    plan = layer.prepare(choices, decode_m)
    assert plan.layouts == (layout,) and layer.weight.is_meta
    assert held_bytes(layer) == layout_bytes(layout, 72, 64, torch.bfloat16, True) + layer.bias.nbytes
    for m in (1, 2, 8, 9, 16, 17, 32, 33, 64):  # every row of the table, each now on the one layout
        torch.testing.assert_close(layer(x[:m]).float(), ref[:m], **TOL)


def test_a_budget_buys_the_next_most_used_layouts_and_the_fit_check_counts_them():
    layer = bf16_layer()
    x = torch.randn(64, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    panels, packed = (layout_bytes(lay, 72, 64, torch.bfloat16, True) for lay in ("panels", "packed_f32"))
    choices = by_m(ROWS, 64)
    plan = plan_layouts(choices, 72, 64, torch.bfloat16, True, decode_m=1, budget=packed)
    assert plan.layouts == ("panels", "packed_f32") and plan.budget_used == packed  # 32 M run packed_f32
    assert plan.by_m[64] == GemmChoice("packed_f32") and plan.by_m[20] == GemmChoice("brgemm")
    assert layer.kept_bytes(choices, 1, packed) == panels + packed - 72 * 64 * 2
    layer.prepare(choices, 1, packed)
    assert held_bytes(layer) == panels + packed + layer.bias.nbytes
    for m in (1, 20, 64):
        torch.testing.assert_close(layer(x[:m]).float(), ref[:m], **TOL)


def test_a_float32_copy_needs_the_budget_even_as_the_one_layout():
    choices = [GemmChoice("packed_f32")] * 9
    plan = plan_layouts(choices, 32, 16, torch.bfloat16)
    assert plan.layouts == ("packed",) and set(plan.by_m) == {GemmChoice("packed")} and plan.extra_bytes == 0
    assert plan_layouts(choices, 32, 16, torch.float32).layouts == ("packed",)  # float32: the same bytes
    paid = plan_layouts(choices, 32, 16, torch.bfloat16, budget=32 * 16 * 2)
    assert paid.layouts == ("packed_f32",) and paid.extra_bytes == paid.budget_used == 32 * 16 * 2


def test_a_tied_head_keeps_a_layout_its_rows_read_back_from():
    layer = bf16_layer()
    weight = layer.weight.detach().clone()
    layer.rows_read = True  # as an lm_head tied to the embedding
    ids = torch.tensor([0, 17, 71, 5])
    for decode_m, layout in ((1, "panels"), (8, "pairs")):
        plan = layer.plan(by_m(ROWS, 64), decode_m)
        assert plan.layouts == (layout,)
    packed_only = [GemmChoice("packed")] * 9  # oneDNN's layout cannot give rows back: the weight stays
    assert layer.plan(packed_only, 8).layouts == ("weight",)
    layer.prepare(by_m(ROWS, 64), decode_m=8)
    assert layer.weight.is_meta and torch.equal(layer.rows(ids), weight[ids])


def test_a_bfloat16_engine_holds_its_weights_once_and_answers_as_f_linear_does(tmp_path):
    path = make_tiny_model(tmp_path / "m", arch="llama", dtype="bfloat16", tie_word_embeddings=True)
    tables = {}
    for name, rows in (("mixed", ROWS), ("linear", [(1, "linear", 1)])):  # tied: the embedding reads the head
        tables[name] = tmp_path / f"{name}.json"
        tables[name].write_text(
            json.dumps({"version": 1, "gemm": {"bfloat16": {"*": [list(r) for r in rows]}}})
        )
    prompts = [[1, 5, 9, 30], list(range(3, 40))]  # a decode-sized and a prefill-sized M
    greedy = SamplingParams(temperature=0, max_tokens=6)
    outs = {}
    for name, table in tables.items():
        llm = LLM(str(path), max_num_seqs=4, kernel_profile=str(table))
        model = llm.engine.model
        linears = [m for m in model.modules() if isinstance(m, SmoothLinear)]
        assert all(m.weight.is_meta for m in linears) == (name == "mixed")
        assert isinstance(model.embed_tokens, TiedEmbedding) == (name == "mixed")  # no second vocab matrix
        weights = sum(m.weight.numel() * 2 for m in linears)  # bfloat16: one copy, as loaded
        table, sched = GemmTable.load(table), llm.engine.config.scheduler
        counted = meta_model(llm.engine.model_config).kernel_copy_bytes(
            table, sched.max_num_batched_tokens, sched.max_num_seqs
        )
        held = sum(held_bytes(m) for m in linears) - sum(m.bias.nbytes for m in linears if m.bias is not None)
        assert counted == held - weights  # the fit check counts exactly what is kept
        assert (
            weights
            <= sum(held_bytes(m) for m in linears) - sum(m.bias.nbytes for m in linears if m.bias is not None)
            <= 1.1 * weights
        )
        outs[name] = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert outs["mixed"] == outs["linear"]
