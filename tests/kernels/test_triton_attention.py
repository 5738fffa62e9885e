"""The Triton Meta-Attention kernel equals the torch reference for every mask kind and table layout.

Runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before triton loads; `make
test-triton`), natively on a CUDA machine. Skipped where triton is not installed (the default `make test`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from meshserve.kernels.attention import TRITON_TILES  # noqa: E402
from meshserve.kernels.attention_tiles import COL, MaskKind, plan_tasks  # noqa: E402
from meshserve.kernels.meta_attention import paged_attention, plan_attention  # noqa: E402
from meshserve.kernels.triton_attention import triton_attention  # noqa: E402
from tests.kernels.test_meta_attention import build_batch, shared_prefix_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# A decode (mask NONE), a 3-row verify block, a 70-row chunk over 37 cached tokens (two 64-row causal
# tiles), a fresh 20-token prompt; lengths are odd so no tile or KV block is full.
MIXED = [(10, 1), (5, 3), (37, 70), (0, 20)]


def random_step(seqs, block_size, kv_heads, heads, dim, dtype, seed):
    """A batch over shuffled cache blocks (build_batch), random cache, q, k, v on DEVICE."""
    meta, num_blocks = build_batch([c for c, _ in seqs], [q for _, q in seqs], block_size, seed)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    q, k, v = (
        torch.randn(meta.num_tokens, n, dim, generator=gen).to(dtype) for n in (heads, kv_heads, kv_heads)
    )
    return meta, cache, q, k, v


def check(meta, cache, q, k, v, block_size, window=None, tree_masks=None, expected=None):
    """Run the kernel on DEVICE and compare it with the torch reference (or `expected`); returns the table."""
    heads, kv_heads, dim = q.shape[1], cache.shape[3], q.shape[2]
    if expected is None:
        plan = plan_attention(meta, block_size, window)
        expected = paged_attention(q, k, v, cache.clone(), plan, dim**-0.5)
    table = plan_tasks(meta, heads, kv_heads, TRITON_TILES, 1, window=window, tree_masks=tree_masks)
    on = [t.to(DEVICE) for t in (q, k, v, cache)]
    out = triton_attention(*on, table, dim**-0.5)
    assert torch.equal(on[3].cpu(), paged_cache(meta, cache, k, v))  # this step's K/V landed in their slots
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tol, rtol=tol)
    return table


def paged_cache(meta, cache, k, v):
    written = cache.clone()
    kv_heads, dim = cache.shape[-2:]
    written[0].view(-1, kv_heads, dim)[meta.slot_mapping] = k
    written[1].view(-1, kv_heads, dim)[meta.slot_mapping] = v
    return written


@pytest.mark.parametrize(
    ("window", "kinds"),
    [(None, {MaskKind.NONE, MaskKind.CAUSAL}), (6, {MaskKind.NONE, MaskKind.SLIDING})],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_reference_for_each_mask_kind(window, kinds, dtype):
    meta, cache, q, k, v = random_step(MIXED, 4, 2, 4, 16, dtype, seed=1)
    table = check(meta, cache, q, k, v, 4, window=window)
    assert set(table.tasks[:, COL["mask"]].tolist()) == kinds


@pytest.mark.parametrize(
    ("kv_heads", "group", "dim", "block_size"), [(1, 4, 24, 1), (2, 3, 32, 16), (3, 1, 8, 5)]
)
def test_gqa_groups_odd_head_dims_and_block_sizes(kv_heads, group, dim, block_size):
    """Group 4 onto one KV head, 3 onto each of 2, no GQA; head dims 24 and 8 pad to the kernel's 16/32."""
    meta, cache, q, k, v = random_step(
        [(3, 1), (19, 7), (0, 1), (30, 17)],
        block_size,
        kv_heads,
        kv_heads * group,
        dim,
        torch.float32,
        seed=group,
    )
    check(meta, cache, q, k, v, block_size, window=4 if kv_heads == 3 else None)


def test_tree_verify_mask_matches_masked_attention():
    """A 4-token tree draft (root, two children of the root, a grandchild) verified over a 9-token prefix."""
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    meta, cache, q, k, v = random_step([(9, 4), (5, 1)], 4, 2, 4, 16, torch.float32, seed=5)
    written = paged_cache(meta, cache, k, v)
    flat = written.reshape(2, -1, 2, 16)
    pos = torch.arange(13)
    slots = meta.block_tables[0].long()[pos // 4] * 4 + pos % 4
    allowed = torch.ones(4, 13, dtype=torch.bool)
    allowed[:, 9:] = tree
    keys, values = (flat[i, slots].repeat_interleave(2, dim=1).transpose(0, 1) for i in (0, 1))
    scores = (q[:4].transpose(0, 1) @ keys.transpose(1, 2) * 0.25).masked_fill(~allowed, -torch.inf)
    expected = paged_attention(q, k, v, cache.clone(), plan_attention(meta, 4), 0.25)
    expected[:4] = (torch.softmax(scores, -1) @ values).transpose(0, 1)  # the decode keeps the reference's

    table = check(meta, cache, q, k, v, 4, tree_masks={0: tree}, expected=expected)
    assert (table.tasks[:, COL["mask"]] == MaskKind.TREE).sum() == 2  # both KV heads of the tree tile


def test_sequences_sharing_prefix_blocks_and_a_strided_query():
    """Prefix caching: two tables point at the same two cached blocks, then at their own; q is a column
    slice of a fused qkv (not contiguous), as the layer's split gives it."""
    block_size, gen = 4, torch.Generator().manual_seed(7)
    meta = shared_prefix_batch(block_size)
    cache = torch.randn(2, 10, block_size, 2, 16, generator=gen)
    qkv = torch.randn(9, 8, 16, generator=gen)
    q, k, v = qkv[:, :4], qkv[:, 4:6].contiguous(), qkv[:, 6:].contiguous()
    assert not q.is_contiguous()
    check(meta, cache, q, k, v, block_size)


@pytest.mark.skipif(DEVICE == "cuda", reason="the model runs on CPU tensors: the interpreter's case")
@pytest.mark.parametrize(("arch", "overrides"), [("llama", {}), ("mixtral", {"sliding_window": 5})])
def test_a_model_forward_through_the_kernel_matches_the_reference(
    tiny_model_dir, monkeypatch, switch, arch, overrides
):
    """MESHSERVE_ATTENTION=triton sends every layer's attention through the kernel: a prefill of two
    prompts, then a step mixing a decode with a chunk, give the reference path's logits. (Mixtral's
    layers all share one window, so each forward plans one table.)"""
    from meshserve.kernels import triton_attention as module
    from meshserve.models import load_model
    from meshserve.testing import PagedSequences

    lm = load_model(tiny_model_dir(arch, **overrides))
    calls, copies = [], []
    kernel, prepare = module.triton_attention, module.prepare
    monkeypatch.setattr(module, "triton_attention", lambda *args: calls.append(1) or kernel(*args))
    monkeypatch.setattr(module, "prepare", lambda *args: copies.append(1) or prepare(*args))

    def run(backend: str) -> list[torch.Tensor]:
        switch("MESHSERVE_ATTENTION", backend)
        seqs = PagedSequences(lm)
        a, b = seqs.add([1, 5, 6, 7, 9, 2, 8]), seqs.add([1, 9, 4, 3, 3, 3, 3, 3, 3, 3, 3])
        first, second = seqs.step({a: 6, b: 3}), seqs.step({a: 1, b: 8})
        return [first[a], first[b], second[a], second[b]]

    for got, want in zip(run("triton"), run("reference"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(calls) == 2 * lm.config.num_layers
    assert len(copies) == 2  # the table goes to the device once per forward, not once per layer


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tests above compile it for real")
def test_the_kernel_compiles_for_ampere_and_hopper_without_a_gpu():
    """The interpreter does not check block shapes or types the way the compiler does; compiling to a cubin
    (ptxas ships with triton) does, for each dtype the GPU path serves."""
    script = (
        "import torch\n"
        "from meshserve.kernels.triton_attention import compile_ahead\n"
        "for cap in (80, 90):\n"
        "    for dtype in (torch.float32, torch.float16, torch.bfloat16):\n"
        "        assert compile_ahead(dtype, head_dim=128, block_size=16, group=4, capability=cap)['cubin']\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=99)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_part_cache_reads_its_keys_as_values(dtype):
    """MLA's one-part cache [1, blocks, block_size, 1, D]: each row is read as key and as value (no V half);
    the kernel over it equals the kernel over a two-part cache holding the rows twice, and the reference."""
    meta, cache, q, k, _ = random_step(MIXED, 4, 1, 8, 32, dtype, seed=5)
    table = plan_tasks(meta, 8, 1, TRITON_TILES, 1)
    q_on, k_on = q.to(DEVICE), k.to(DEVICE)
    two = torch.stack((cache[0], cache[0])).to(DEVICE)
    one = cache[:1].clone().to(DEVICE)
    expected = triton_attention(q_on, k_on, k_on, two, table, 0.2)
    out = triton_attention(q_on, k_on, k_on, one, table, 0.2)
    assert torch.equal(one[0], two[0]) and torch.equal(out, expected)
    reference = paged_attention(q, k, k, cache[:1].clone(), plan_attention(meta, 4), 0.2)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), reference.float(), atol=tol, rtol=tol)
