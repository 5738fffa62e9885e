"""Paged attention over a mixed flat batch equals plain causal attention run one sequence at a time."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels.meta_attention import paged_attention, plan_attention
from meshserve.models.batch import PAD_BLOCK, BatchMetadata


def build_batch(context: list[int], q_lens: list[int], block_size: int, seed: int):
    """Sequences with `context` tokens already cached and q_lens new ones, in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context, q_lens, strict=True)]
    need = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables, slots, positions, starts = [], [], [], [0]
    for c, q, n in zip(context, q_lens, need, strict=True):
        table = [order.pop() for _ in range(n)]
        tables.append(table)
        pos = torch.arange(c, c + q)
        positions.append(pos)
        slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q)
    width = max(need)
    return BatchMetadata(
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [PAD_BLOCK] * (width - len(t)) for t in tables], dtype=torch.int32),
        logits_indices=torch.arange(starts[-1]),
    ), sum(need) + 3


def shared_prefix_batch(block_size: int = 4) -> BatchMetadata:
    """Prefix caching: two sequences' tables point at the same two cached blocks (6, 2), then at their own;
    3 and 6 new tokens after 8 cached ones (block tables padded with PAD_BLOCK)."""
    tables = torch.tensor([[6, 2, 9, PAD_BLOCK], [6, 2, 4, 1]], dtype=torch.int32)
    q_lens = torch.tensor([3, 6])
    pos = torch.cat([torch.arange(8, 11), torch.arange(8, 14)])
    seq_of = torch.repeat_interleave(torch.arange(2), q_lens)
    return BatchMetadata(
        positions=pos,
        slot_mapping=tables.long()[seq_of, pos // block_size] * block_size + pos % block_size,
        query_start_loc=torch.tensor([0, 3, 9], dtype=torch.int32),
        seq_lens=torch.tensor([11, 14], dtype=torch.int32),
        block_tables=tables,
        logits_indices=torch.tensor([2, 8]),
    )


def dense_reference(q, keys, values, q_len, scale):
    """Causal attention of the last q_len rows over all keys of one sequence (GQA by repeating KV heads)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) * scale
    n = keys.shape[0]
    causal = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 12)), min_size=1, max_size=5).filter(
        lambda s: any(q for _, q in s)
    ),
    block_size=st.sampled_from([1, 2, 4, 8]),
    kv_heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 1000),
)
def test_paged_attention_equals_per_sequence_causal_attention(seqs, block_size, kv_heads, seed):
    context, q_lens = [c for c, _ in seqs], [q for _, q in seqs]
    meta, num_blocks = build_batch(context, q_lens, block_size, seed)
    heads, dim, t = 4, 8, meta.num_tokens
    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, dim)
    # Each sequence's full K/V history; the cached part is written into the cache up front.
    history = [tuple(torch.randn(c + q, kv_heads, dim, generator=gen) for _ in "kv") for c, q in seqs]
    flat_cache = cache.view(2, -1, kv_heads, dim)
    for s, (c, _) in enumerate(seqs):
        table = meta.block_tables[s].long()
        pos = torch.arange(c)
        slot = table[pos // block_size] * block_size + pos % block_size
        flat_cache[0, slot], flat_cache[1, slot] = history[s][0][:c], history[s][1][:c]
    k = torch.cat([history[s][0][c:] for s, (c, _) in enumerate(seqs)])
    v = torch.cat([history[s][1][c:] for s, (c, _) in enumerate(seqs)])
    q = torch.randn(t, heads, dim, generator=gen)

    out = paged_attention(q, k, v, cache, plan_attention(meta, block_size), scale=dim**-0.5)

    torch.testing.assert_close(flat_cache[0, meta.slot_mapping], k)  # new K/V landed in their slots
    torch.testing.assert_close(flat_cache[1, meta.slot_mapping], v)
    starts = meta.query_start_loc.tolist()
    for s, (_, q_len) in enumerate(seqs):
        rows = slice(starts[s], starts[s + 1])
        expected = dense_reference(q[rows], history[s][0], history[s][1], q_len, dim**-0.5)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


def test_plan_groups_sequences_by_query_and_kv_length():
    meta, _ = build_batch(context=[5, 0, 7, 3, 0, 40], q_lens=[1, 7, 1, 30, 0, 1], block_size=4, seed=0)
    plan = plan_attention(meta, block_size=4)
    shapes = sorted((tuple(g.gather_rows.shape), g.kv_slots.shape[1]) for g in plan.groups)
    # Decodes of 6 and 8 KV positions share a group; the 41-long one does not pad them to 41.
    assert shapes == [((1, 1), 41), ((1, 7), 7), ((1, 30), 33), ((2, 1), 8)]
    assert sum(len(g.out_rows) for g in plan.groups) == meta.num_tokens
