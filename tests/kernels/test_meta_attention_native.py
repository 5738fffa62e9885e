"""The native Meta-Attention op equals the torch reference (and plain masked attention) for each mask kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.kernels import native
from meshserve.kernels.attention_tiles import MaskKind, TileSizes, plan_tasks
from meshserve.kernels.meta_attention import paged_attention, plan_attention
from meshserve.kernels.meta_attention_native import meta_attention
from tests.kernels.test_meta_attention import build_batch, dense_reference, shared_prefix_batch

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def native_op():
    """Every test here needs the built op; the first test says how to build it when it is missing."""
    if not native.load():
        pytest.fail(f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)")


def test_native_op_is_built_and_loaded():
    assert native.load(), f"native kernels missing: run `{native.BUILD_COMMAND}` (make test does)"
    assert hasattr(torch.ops.meshserve, "meta_attention")


def random_step(seqs, block_size, kv_heads, heads, dim, dtype, seed):
    context, q_lens = [c for c, _ in seqs], [q for _, q in seqs]
    meta, num_blocks = build_batch(context, q_lens, block_size, seed)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    q, k, v = (
        torch.randn(meta.num_tokens, n, dim, generator=gen).to(dtype) for n in (heads, kv_heads, kv_heads)
    )
    return meta, cache, q, k, v


@settings(max_examples=25, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 40)), min_size=1, max_size=5).filter(
        lambda s: any(q for _, q in s)
    ),
    block_size=st.sampled_from([1, 4, 16]),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([8, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    window=st.sampled_from([None, 1, 6, 33]),
    threads=st.sampled_from([1, 2, 3]),
    split_kv=st.booleans(),
    tile_rows=st.sampled_from([1, 5, 16, 64]),
    softcap=st.sampled_from([None, 0.5, 5.0]),
    seed=st.integers(0, 1000),
)
def test_native_equals_torch_reference(
    seqs, block_size, kv_heads, group, dim, dtype, window, threads, split_kv, tile_rows, softcap, seed
):
    heads = kv_heads * group
    meta, cache, q, k, v = random_step(seqs, block_size, kv_heads, heads, dim, dtype, seed)
    sizes = TileSizes(prefill_rows=tile_rows, short_rows=4, min_split_kv=4 if split_kv else 10**9)
    native_cache, plan = cache.clone(), plan_attention(meta, block_size, window)

    paged_attention(q, k, v, cache, plan, dim**-0.5)  # the slot write, in the cache's dtype
    # the values from float32 copies of the same inputs: the torch reference rounds scores and
    # probabilities to bfloat16 (as transformers does), which can land further from the exact result
    # than the kernel's float32 arithmetic (one seed: 0.022 off, the kernel 3e-5)
    expected = paged_attention(q.float(), k.float(), v.float(), cache.float(), plan, dim**-0.5, softcap)
    table = plan_tasks(meta, heads, kv_heads, sizes, threads, window=window)
    out = meta_attention(q, k, v, native_cache, table, dim**-0.5, softcap)

    assert torch.equal(native_cache, cache)  # the same slot write
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_tiles_skip_chunks_above_the_diagonal(dtype, window, dim, threads):
    """A 100-row chunk over 45 cached tokens in 64-row tiles (the prefill tile kernel): the early rows of a
    tile see none of its last KV chunks (skipped), chunks the diagonal crosses are masked, and with a window
    the chunks wholly before it are skipped too; split parts (2 threads) cover the same paths."""
    meta, cache, q, k, v = random_step([(45, 100), (0, 37), (70, 1)], 16, 2, 4, dim, dtype, seed=dim)
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, 16, window), dim**-0.5)
    table = plan_tasks(meta, 4, 2, TileSizes(64, 8, 32), threads, window=window)
    assert (table.tasks[:, 2] == 64).any()  # a full 64-row tile
    out = meta_attention(q, k, v, cache, table, dim**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_tiles_over_odd_kv_lengths(dtype, group, dim, threads):
    """Decodes (G rows per task: the register-resident decode tile up to 4, the prefill tile above) with KV
    lengths around the 4-position score blocks and the 32-position chunks (1, 3, 5, 31, 33, 67, 130), several
    tasks per thread row (each prefetches the next chunk), a long one split across the threads."""
    contexts = [0, 2, 4, 30, 32, 66, 129, 1200]
    meta, cache, q, k, v = random_step([(c, 1) for c in contexts], 16, 1, group, dim, dtype, seed=group)
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, 16), dim**-0.5)
    table = plan_tasks(meta, group, 1, TileSizes(16, 4, 64), threads)
    assert (table.combine.shape[0] > 0) == (threads > 1)  # the 1201-position decode is split in two
    out = meta_attention(q, k, v, cache, table, dim**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_decode_tile_row_with_a_wholly_hidden_chunk(dtype, dim):
    """A 4-row causal task (the decode tile) whose first row ends on a chunk's last position: the next
    chunk is all masked for that row (its probabilities 0, its running max and sum untouched) while the
    other rows see part of it."""
    meta, cache, q, k, v = random_step([(31, 4), (60, 3)], 16, 2, 2, dim, dtype, seed=dim)
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, 16), dim**-0.5)
    table = plan_tasks(meta, 2, 2, TileSizes(16, 4, 64), 1)
    assert (table.tasks[:, 2] == 4).any() and (table.tasks[:, 7] == 1).all()  # 4-row causal tasks
    out = meta_attention(q, k, v, cache, table, dim**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_split_kv_parts_are_combined_for_one_long_decode():
    meta, cache, q, k, v = random_step([(700, 1)], 16, 1, 4, 64, torch.float32, seed=3)
    table = plan_tasks(meta, 4, 1, TileSizes(16, 4, 64), num_threads=2)
    assert len(table.tasks) == 2 and table.combine.shape[0] == 1  # one unit, split across both threads
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, 16), 0.125)
    torch.testing.assert_close(meta_attention(q, k, v, cache, table, 0.125), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("softcap", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_verify_mask_matches_masked_attention(dtype, softcap):
    """A 4-token tree draft (root, two children of the root, a grandchild) verified over a 9-token prefix;
    soft-capped scores (Gemma 2's tanh) too."""
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    meta, cache, q, k, v = random_step([(9, 4), (5, 1)], 4, 2, 4, 16, dtype, seed=5)
    table = plan_tasks(meta, 4, 2, TileSizes(16, 8, 256), num_threads=2, tree_masks={0: tree})
    assert (table.tasks[:, 7] == MaskKind.TREE).sum() == 2  # both KV heads of the tree tile
    out = meta_attention(q, k, v, cache, table, 0.25, softcap)

    keys, values = _history(cache, meta, 0, 13)  # read after the op: it wrote this step's K/V
    allowed = torch.ones(4, 13, dtype=torch.bool)
    allowed[:, 9:] = tree
    group_keys = keys.repeat_interleave(2, dim=1).transpose(0, 1)
    group_values = values.repeat_interleave(2, dim=1).transpose(0, 1)
    scores = q[:4].float().transpose(0, 1) @ group_keys.transpose(1, 2) * 0.25
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, -torch.inf)
    expected = (torch.softmax(scores, -1) @ group_values).transpose(0, 1)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out[:4].float(), expected, atol=tol, rtol=tol)
    if softcap is None:
        decode = dense_reference(q[4:5].float(), *_history(cache, meta, 1, 6), 1, 0.25)
        torch.testing.assert_close(out[4:5].float(), decode, atol=tol, rtol=tol)


def _history(cache, meta, seq, length):
    """K and V of one sequence's first `length` positions, read through its block table."""
    pos = torch.arange(length)
    slots = meta.block_tables[seq].long()[pos // 4] * 4 + pos % 4
    flat = cache.reshape(2, -1, *cache.shape[-2:])
    return flat[0, slots].float(), flat[1, slots].float()


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3", "gemma2"])
def test_models_run_the_native_op_by_default(arch, tiny_model_dir, monkeypatch):
    """A forward plans a Task-Table and every layer calls the native op (no silent torch fallback), MLA's
    latent cache (on decode) and Gemma 2's soft-capped scores included."""
    from meshserve.kernels import attention
    from meshserve.models import load_model
    from meshserve.testing import PagedSequences

    calls = []
    monkeypatch.setattr(attention, "meta_attention", lambda *args: calls.append(1) or meta_attention(*args))
    lm = load_model(tiny_model_dir(arch))
    seqs = PagedSequences(lm)
    first, second = seqs.add([1, 5, 6, 7]), seqs.add([1, 9])
    seqs.step({first: 4, second: 2})  # MLA expands a fresh prompt (models/layers/mla.py): no op call
    assert len(calls) == (0 if arch == "deepseek_v3" else lm.config.num_layers)
    calls.clear()
    seqs.tokens[first].append(8)
    seqs.tokens[second].append(3)
    seqs.step({first: 1, second: 1})
    assert len(calls) == lm.config.num_layers


def test_op_registration_and_fake_impl_pass_torch_opcheck():
    """Schema, fake (meta) impl and dispatch agree, so a compiled forward can treat the op as opaque."""
    meta, cache, q, k, v = random_step([(9, 3), (20, 1)], 4, 2, 4, 16, torch.float32, seed=2)
    table = plan_tasks(meta, 4, 2, TileSizes(16, 8, 4), num_threads=2)
    args = (
        q,
        cache,
        table.block_tables,
        table.tasks,
        table.thread_starts,
        table.combine,
        table.tree_mask,
        0.25,
        table.partial_rows,
        0.5,  # softcap
    )
    torch.library.opcheck(
        torch.ops.meshserve.meta_attention.default, args, test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequences_sharing_prefix_blocks(dtype):
    """Prefix caching: two sequences' tables point at the same two cached blocks, then at their own."""
    block_size, gen = 4, torch.Generator().manual_seed(7)
    meta = shared_prefix_batch(block_size)
    cache = torch.randn(2, 10, block_size, 2, 16, generator=gen).to(dtype)
    q = torch.randn(9, 4, 16, generator=gen).to(dtype)
    k, v = (torch.randn(9, 2, 16, generator=gen).to(dtype) for _ in "kv")
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, block_size), 0.25)
    out = meta_attention(q, k, v, cache, plan_tasks(meta, 4, 2, TileSizes(4, 4, 4), 2), 0.25)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [40, 64, 576])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_part_cache_reads_its_keys_as_values(dtype, dim, threads):
    """MLA's cache [1, blocks, block_size, 1, D]: each row is the key and also the value (its first dims are
    the latent). The op and the reference over it equal both over a two-part cache holding the rows twice:
    decodes over 16 heads (MQA), a chunked prefill, and a long decode split in parts (2 threads)."""
    meta, cache, q, k, _ = random_step([(40, 1), (0, 23), (9, 5), (300, 1)], 4, 1, 16, dim, dtype, seed=dim)
    two = torch.stack((cache[0], cache[0]))
    sizes = TileSizes(16, 4, 64)
    expected = meta_attention(q, k, k, two, plan_tasks(meta, 16, 1, sizes, threads), 0.1)
    one = cache[:1].clone()
    out = meta_attention(q, k, k, one, plan_tasks(meta, 16, 1, sizes, threads), 0.1)
    assert torch.equal(one[0], two[0]) and torch.equal(out, expected)
    # the reference on float32 copies (its bfloat16 rounding of scores is further off; see above)
    reference = paged_attention(
        q.float(), k.float(), k.float(), cache[:1].float(), plan_attention(meta, 4), 0.1
    )
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), reference.float(), atol=tol, rtol=tol)
