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


# (table, the layout kept): M = 1's, however many larger M pick another
TABLES = [
    (ROWS, "panels"),
    ([(1, "dpbf16", 1), (4, "linear", 1), (8, "dpbf16", 1), (64, "linear", 1)], "pairs"),
    ([(1, "packed", 1), (64, "brgemm", 1)], "packed"),
]


@pytest.mark.parametrize(("rows", "layout"), TABLES)
def test_a_layer_keeps_one_layout_whatever_its_table_picks(rows, layout):
    layer = bf16_layer()
    x = torch.randn(64, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())  # the oracle, before any packing
    choices = by_m(rows, 64)
    kept = layout_bytes(layout, 72, 64, torch.bfloat16, True)
    assert layer.kept_bytes(choices) == kept - 72 * 64 * 2
    plan = layer.prepare(choices)
    assert plan.layouts == (layout,) and layer.weight.is_meta == (layout != "weight")
    assert plan.by_m[1] == choices[1]  # batch-1 decode runs the table's own choice
    assert held_bytes(layer) == kept + layer.bias.nbytes
    for m in (1, 2, 8, 9, 16, 17, 32, 33, 64):  # every row of the table, each now on the one layout
        torch.testing.assert_close(layer(x[:m]).float(), ref[:m], **TOL)


def test_batch_one_keeps_its_layout_when_most_larger_batches_pick_another(tmp_path):
    """The 1B Llama's 2048x2048 table on this project's 2-core avx512_bf16 host: dpbf16 at M = 1, 2 and 5..8,
    F.linear at 3, 4 and 9..256. Weighting M = 1..max_num_seqs by 1/M kept the loaded weight, and batch-1
    decode ran F.linear at 0.44x the speed (docs/gemm.md)."""
    rows = [(2, "dpbf16", 1), (4, "linear", 1), (8, "dpbf16", 1), (256, "linear", 1)]
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"version": 1, "gemm": {"bfloat16": {"*": [list(r) for r in rows]}}}))
    path = make_tiny_model(tmp_path / "m", arch="llama", dtype="bfloat16")
    llm = LLM(str(path), max_num_seqs=64, kernel_profile=str(table))
    linears = [m for m in llm.engine.model.modules() if isinstance(m, SmoothLinear)]
    assert linears and all(m._layouts == {"pairs"} for m in linears)
    assert {m._by_m[m_] for m in linears for m_ in (1, 3, 64)} == {GemmChoice("dpbf16")}


def test_a_plain_gemv_at_batch_one_gives_way_to_the_layout_the_decode_batches_pick(tmp_path):
    """This project's 2-core avx512_bf16 float32 table for the toy Llama: F.linear at M = 1, oneDNN's packed
    layout at most larger M. Keeping M = 1's loaded weight ran F.linear at every batch (toy float32 race
    1,194-1,284 vs 1,406-1,579 tok/s); the 1/M-weighted vote over M = 1..max_num_seqs keeps packed."""
    rows = [(1, "linear", 1), (3, "packed", 1), (4, "linear", 1), (256, "packed", 1)]
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"version": 1, "gemm": {"float32": {"*": [list(r) for r in rows]}}}))
    path = make_tiny_model(tmp_path / "m", arch="llama", dtype="float32")
    prompts, greedy = [[1, 5, 9, 30], list(range(3, 40))], SamplingParams(temperature=0, max_tokens=6)
    outs = []
    for seqs, layout in ((64, "packed"), (1, "weight")):  # at max_num_seqs=1 only M = 1 votes
        llm = LLM(str(path), max_num_seqs=seqs, kernel_profile=str(table))
        linears = [m for m in llm.engine.model.modules() if isinstance(m, SmoothLinear)]
        assert linears and all(m._layouts == {layout} for m in linears)
        if layout == "packed":  # M = 1 runs the nearest packed choice; M = 4's F.linear too
            assert {m._by_m[m_] for m in linears for m_ in (1, 4, 64)} == {GemmChoice("packed")}
        outs.append([o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_the_vote_keeps_batch_one_layout_unless_it_is_the_loaded_weight():
    packed_above = [(1, "linear", 1), (64, "packed", 1)]
    assert plan_layouts(by_m(packed_above, 64), 32, 16, torch.float32, decode_m=64).layouts == ("packed",)
    assert plan_layouts(by_m(packed_above, 64), 32, 16, torch.float32).layouts == ("weight",)  # decode_m=1
    linear_above = [(1, "dpbf16", 1), (64, "linear", 1)]  # a prepared layout at M = 1 is kept whatever votes
    assert plan_layouts(by_m(linear_above, 64), 32, 16, torch.bfloat16, decode_m=64).layouts == ("pairs",)
    tied = plan_layouts(by_m(packed_above, 64), 32, 16, torch.float32, rows_read=True, decode_m=64)
    assert tied.layouts == ("weight",)  # oneDNN's layout gives no rows back to a tied embedding


def test_a_budget_buys_the_next_most_used_layouts_and_the_fit_check_counts_them():
    layer = bf16_layer()
    x = torch.randn(64, 64).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    panels, packed = (layout_bytes(lay, 72, 64, torch.bfloat16, True) for lay in ("panels", "packed_f32"))
    choices = by_m(ROWS, 64)
    plan = plan_layouts(choices, 72, 64, torch.bfloat16, True, budget=packed)
    assert plan.layouts == ("panels", "packed_f32") and plan.budget_used == packed  # 32 M run packed_f32
    assert plan.by_m[64] == GemmChoice("packed_f32") and plan.by_m[20] == GemmChoice("brgemm")
    assert layer.kept_bytes(choices, packed) == panels + packed - 72 * 64 * 2
    layer.prepare(choices, packed)
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
    onednn_first = [(1, "packed", 1), (8, "dpbf16", 1), (64, "brgemm", 1)]  # oneDNN's layout has no rows
    for rows, layout in ((ROWS, "panels"), (onednn_first, "pairs")):
        assert layer.plan(by_m(rows, 64)).layouts == (layout,)
    packed_only = [GemmChoice("packed")] * 9  # oneDNN's layout cannot give rows back: the weight stays
    assert layer.plan(packed_only).layouts == ("weight",)
    layer.prepare(by_m(onednn_first, 64))
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
        counted = meta_model(llm.engine.model_config).kernel_copy_bytes(table, sched.max_num_batched_tokens)
        held = sum(held_bytes(m) for m in linears) - sum(m.bias.nbytes for m in linears if m.bias is not None)
        assert counted == held - weights  # the fit check counts exactly what is kept
        assert (
            weights
            <= sum(held_bytes(m) for m in linears) - sum(m.bias.nbytes for m in linears if m.bias is not None)
            <= 1.1 * weights
        )
        outs[name] = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert outs["mixed"] == outs["linear"]
