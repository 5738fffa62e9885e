"""KV blocks under speculative decoding and prefix caching: rejected drafts roll back, a request aborted
mid-verify returns all its blocks, nothing leaks, cached blocks are evicted only when unreferenced."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.engine import Engine, SamplingParams
from meshserve.engine.scheduler import WorkKind
from meshserve.engine.spec.layer_skip import write_layer_skip_draft

PIECES = [[1, 20, 21, 22, 23, 24, 25, 26], [30, 31, 30, 31, 30, 31], [40, 41, 42], [50]]


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    path = tiny_model_dir("llama")
    draft = write_layer_skip_draft(path, tmp_path_factory.mktemp("draft") / "d", 1)
    specs = {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3},
        "draft": {"method": "draft_model", "num_speculative_tokens": 3, "model": str(draft)},
    }
    return {
        name: Engine.from_args(
            str(path),
            speculative_config=spec,
            block_size=2,
            num_kv_blocks=48,
            max_num_seqs=4,
            max_num_batched_tokens=12,
            max_model_len=64,
        )
        for name, spec in specs.items()
    }


def check_blocks(engine: Engine) -> None:
    blocks, cache = engine.blocks, engine.blocks.prefix_cache
    live = engine.scheduler.running + engine.scheduler.waiting
    refs = Counter(b for r in live for b in r.block_table)
    assert all(blocks.ref_counts[b] == n for b, n in refs.items()), "ref count differs from the tables"
    unreferenced = [b for b in range(blocks.num_blocks) if b not in refs]
    assert all(blocks.ref_counts[b] == 0 for b in unreferenced) and min(blocks.ref_counts) >= 0
    free, evictable = set(blocks.free_blocks), {b for b in unreferenced if cache.is_evictable(b)}
    assert not any(cache.is_evictable(b) for b in refs), "a referenced block is evictable"
    assert not free & evictable and len(free) + len(evictable) + len(refs) == blocks.num_blocks, "leak"


def abort_mid_verify(engine: Engine) -> bool:
    """Schedule a step (drafts proposed, verify slots allocated); abort a verifying request before it runs."""
    engine.spec.propose(engine.scheduler.running, engine.max_model_len)
    plan = engine.scheduler.schedule()
    for request in plan.preempted:
        engine.spec.remove(request.request_id)
    verifying = [it.request for it in plan.items if it.kind is WorkKind.VERIFY]
    if not verifying:
        return False
    engine.abort(verifying[0].request_id)
    return True


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("abort_mid_verify"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@pytest.mark.parametrize("method", ["ngram", "draft"])
@settings(max_examples=25, deadline=None)
@given(ops=ops)
def test_blocks_return_whatever_the_interleaving(engines, method, ops):
    engine = engines[method]
    for op, a, b in ops:
        if op == "add":
            prompt = [t for i in a for t in PIECES[i]]
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=b, ignore_eos=True))
        elif op == "step":
            for _ in range(a):
                engine.step()
        elif op == "abort":
            live = sorted(engine.requests)
            if live:
                engine.abort(live[a % len(live)])
        else:
            abort_mid_verify(engine)
        check_blocks(engine)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    check_blocks(engine)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    if method == "draft":
        proposer = engine.spec.proposer
        assert not proposer.seqs and len(proposer.runner.free_slots) == proposer.runner.num_slots


def test_abort_mid_verify_returns_every_block(engines):
    engine = engines["ngram"]
    engine.add_request([30, 31] * 6, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.add_request([1, 20, 21, 22], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    aborted = False
    for _ in range(40):
        if abort_mid_verify(engine):
            aborted = True
            break
        engine.step()
    assert aborted, "no verify step happened"
    check_blocks(engine)
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not any(engine.blocks.ref_counts)


def test_rollback_with_scattered_blocks_keeps_greedy_output(tiny_model_dir):
    """Two requests grow block by block in turn, so each one's blocks are scattered; drafts get rejected
    and rolled back inside those tables, and the output still equals decoding without speculation."""
    path = str(tiny_model_dir("llama"))
    prompts = [[30, 31] * 5 + [7], [40, 41, 42] * 3]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = {}
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}):
        engine = Engine.from_args(
            path, speculative_config=spec, block_size=2, max_num_seqs=2, enable_prefix_caching=False
        )
        ids = [engine.add_request(p, params) for p in prompts]
        scattered = False
        results = {}
        while engine.has_unfinished():
            for out in engine.step():
                results[out.request_id] = out.token_ids
            for r in engine.scheduler.running:
                table = r.block_table
                scattered |= any(b - a != 1 for a, b in zip(table, table[1:], strict=False))
                # Rolled back: no block is held past the verified tokens (verify allocated k + 1 slots).
                assert len(table) <= -(-r.num_tokens // 2)
        outputs[spec is None] = [results[i] for i in ids]
        assert scattered
        if spec is not None:
            assert engine.spec.accepted_tokens < engine.spec.draft_tokens  # some drafts were rejected
    assert outputs[True] == outputs[False]
