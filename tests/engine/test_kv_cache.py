"""Block manager: ref counts and the free list stay consistent whatever sequence of grows and frees."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.config import CacheConfig
from meshserve.engine.kv_cache import BlockManager, allocate_kv_cache, block_bytes, num_kv_blocks
from meshserve.engine.request import Request
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError


def make_request(n: int = 1) -> Request:
    return Request("r", list(range(n)), SamplingParams(), max_tokens=8)


def check_consistent(manager: BlockManager, requests: list[Request]) -> None:
    owned = [b for r in requests for b in r.block_table]
    assert len(owned) == len(set(owned)), "a block is in two tables"
    assert not set(owned) & set(manager.free_blocks), "a block is both owned and free"
    assert len(owned) + manager.num_free_blocks == manager.num_blocks, "a block leaked"
    assert all(manager.ref_counts[b] == 1 for b in owned)
    assert all(manager.ref_counts[b] == 0 for b in manager.free_blocks)


def test_allocate_grows_table_to_cover_tokens():
    manager = BlockManager(num_blocks=4, block_size=16)
    request = make_request()
    assert manager.allocate(request, 17)
    assert len(request.block_table) == 2
    assert manager.allocate(request, 32) and len(request.block_table) == 2  # already covered
    assert not manager.allocate(request, 16 * 5)  # too big: nothing changes
    assert len(request.block_table) == 2 and manager.num_free_blocks == 2
    manager.free(request)
    assert request.block_table == [] and manager.num_free_blocks == 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 80)), min_size=1, max_size=60))
def test_blocks_never_leak_or_double_free(ops):
    manager = BlockManager(num_blocks=12, block_size=8)
    requests = [make_request() for _ in range(6)]
    sizes = [0] * 6
    for who, grow in ops:
        request = requests[who]
        if grow == 0:
            manager.free(request)
            sizes[who] = 0
        elif manager.allocate(request, sizes[who] + grow):
            sizes[who] += grow
        assert len(request.block_table) == manager.blocks_for(sizes[who])
        check_consistent(manager, requests)
    for request in requests:
        manager.free(request)
    assert manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)


def test_block_count_from_memory_and_too_small_cache():
    per_block = block_bytes(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    blocks = num_kv_blocks(CacheConfig(kv_cache_memory=per_block * 100 / (1 << 30)), per_block, 256, 4)
    assert blocks == 100
    assert num_kv_blocks(CacheConfig(num_kv_blocks=20), per_block, 256, 4) == 20
    assert num_kv_blocks(CacheConfig(), per_block, 256, 4) <= 4 * 16  # capped at what max_num_seqs can use
    with pytest.raises(InputError, match="at most 10 blocks"):  # the device's free memory bounds any request
        num_kv_blocks(CacheConfig(num_kv_blocks=20), per_block, 256, 4, available=10 * per_block)
    try:
        num_kv_blocks(CacheConfig(num_kv_blocks=3), per_block, 256, 4)
    except InputError as err:
        assert err.field == "num_kv_blocks" and "max_model_len=256" in err.message
    else:
        raise AssertionError("a cache smaller than one request must be refused")


def test_kv_cache_tensors_have_the_contract_shape():
    caches = allocate_kv_cache(
        3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16
    )
    assert len(caches) == 3 and caches[0].shape == (2, 5, 4, 2, 8) and not caches[0].any()


def test_kv_held_outside_the_blocks_comes_out_of_the_budget_and_the_fit_check():
    """The draft model's own KV (``reserved``) shares the KV budget and must fit beside the blocks."""
    per_block = block_bytes(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    hundred = CacheConfig(kv_cache_memory=per_block * 100 / (1 << 30))
    assert num_kv_blocks(hundred, per_block, 256, 4, reserved=30 * per_block) == 70
    with pytest.raises(InputError, match="draft model's KV"):  # 20 blocks + 10 blocks' worth > 25 free
        num_kv_blocks(
            CacheConfig(num_kv_blocks=20),
            per_block,
            256,
            4,
            available=25 * per_block,
            reserved=10 * per_block,
        )
    with pytest.raises(InputError, match="cannot hold one request") as err:  # the draft leaves too little
        num_kv_blocks(hundred, per_block, 256, 4, reserved=90 * per_block)
    assert err.value.field == "kv_cache_memory" and "draft model's KV" in err.value.message
