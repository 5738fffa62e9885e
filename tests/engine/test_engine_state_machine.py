"""A hypothesis state machine over the engine's public operations: add (n = 1-3, prompts of several
blocks, sharing prefixes, ids from a small pool), step, abort at any point, with a KV budget small enough
to force preemption, speculation off and on. After every operation:

- every block's ref count equals the number of block-table entries of live completions that name it, and
  every unreferenced block is either free or an evictable prefix-cache block, exactly once;
- no request is lost or duplicated: the engine's groups are the ones the test added and has not seen end,
  and each unfinished completion is in exactly one of waiting, running or held (NEW);
- a finished request is reported once and forgotten, and its id can be used again.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meshserve.engine import Engine, SamplingParams
from meshserve.engine.request import RequestStatus
from meshserve.engine.spec.layer_skip import write_layer_skip_draft
from meshserve.errors import InputError

IDS = ["a", "b", "c", "d", "e"]
PREFIXES = [[1] + list(range(10, 22)), [1] + list(range(30, 39)), [1]]  # 3 blocks, 2.5 blocks, BOS only
ALWAYS = {"disable_by_batch_size": None}
SPECS = {
    "off": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, **ALWAYS},
    "draft": {"method": "draft_model", "num_speculative_tokens": 2, **ALWAYS},
}

prompts = st.builds(
    lambda prefix, cut, tail: (prefix[:cut] + tail) or [1],
    st.sampled_from(PREFIXES),
    st.integers(1, 13),
    st.lists(st.integers(3, 500), max_size=18),
)
# Each example starts with three of these in flight, stepped until one is preempted (together they need
# about twice the 16 blocks); the drawn rules go on from there. Left to the draws, whether a run preempted
# at all differed between processes: one full-suite worker's run stepped no request at all.
long_prompts = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(PREFIXES[:2]),
    st.lists(st.integers(3, 500), min_size=14, max_size=18),
)
long_params = st.builds(
    SamplingParams, max_tokens=st.integers(16, 24), temperature=st.just(0.0), ignore_eos=st.just(True)
)
params = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 1.0]),
    max_tokens=st.integers(1, 24),
    seed=st.one_of(st.none(), st.integers(0, 50)),
    ignore_eos=st.just(True),
)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.live: set[str] = set()

    @initialize(long=st.lists(long_prompts, min_size=3, max_size=3), sampling=long_params)
    def three_long_requests(self, long: list[list[int]], sampling: SamplingParams) -> None:
        for request_id, prompt in zip("abc", long, strict=True):
            assert self.engine.add_request(prompt, sampling, request_id) == request_id
            self.live.add(request_id)
        preempted = self.engine.num_preemptions
        for _ in range(60):  # step them until the budget forces a preemption, so every example has one
            self.step(1)
            if self.engine.num_preemptions > preempted:
                break
        assert self.engine.num_preemptions > preempted, "three long requests never preempted"

    @rule(request_id=st.sampled_from(IDS), prompt=prompts, sampling=params, stream=st.booleans())
    def add(self, request_id: str, prompt: list[int], sampling: SamplingParams, stream: bool) -> None:
        if request_id in self.live:
            with pytest.raises(InputError, match="already in use"):
                self.engine.add_request(prompt, sampling, request_id, stream=stream)
        else:
            assert self.engine.add_request(prompt, sampling, request_id, stream=stream) == request_id
            self.live.add(request_id)

    @rule(steps=st.integers(1, 6))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            outputs = self.engine.step()
            finished = [o.request_id for o in outputs if o.finished]
            assert len(finished) == len(set(finished)) and set(finished) <= self.live  # reported once
            self.live -= set(finished)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort_live(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        assert self.engine.abort(request_id)
        self.live.remove(request_id)

    @rule(request_id=st.sampled_from(IDS))
    def abort_any(self, request_id: str) -> None:
        assert self.engine.abort(request_id) == (request_id in self.live)
        self.live.discard(request_id)

    @invariant()
    def requests_are_tracked_once(self) -> None:
        engine = self.engine
        assert set(engine.groups) == self.live
        children = [c for g in engine.groups.values() for c in g.children]
        assert sorted(c.request_id for c in children) == sorted(engine.requests)
        waiting, running = engine.scheduler.waiting, engine.scheduler.running
        held = [c for g in engine.groups.values() for c in g.held]
        places = Counter(map(id, waiting + running + held))
        for child in children:
            expected = 0 if child.is_finished else 1
            assert places[id(child)] == expected, child
        assert all(r.status is RequestStatus.WAITING for r in waiting)
        assert all(r.status is RequestStatus.RUNNING for r in running)
        assert all(r.status is RequestStatus.NEW for r in held)
        assert len(places) == len(waiting) + len(running) + len(held)  # nothing finished or foreign queued

    @invariant()
    def ref_counts_match_block_tables(self) -> None:
        blocks = self.engine.blocks
        held = Counter(b for r in self.engine.requests.values() for b in r.block_table)
        assert all(blocks.ref_counts[b] == held[b] for b in range(blocks.num_blocks))
        cache = blocks.prefix_cache
        unreferenced = sorted(
            list(blocks.free_blocks) + [b for b in range(blocks.num_blocks) if cache.is_evictable(b)]
        )
        assert unreferenced == [b for b in range(blocks.num_blocks) if blocks.ref_counts[b] == 0]

    def teardown(self) -> None:
        for request_id in list(self.live):
            assert self.engine.abort(request_id)
        assert _clean(self.engine)


def _clean(engine: Engine) -> bool:
    """Nothing in flight and every block free (cached blocks count as free)."""
    blocks = engine.blocks
    idle = not engine.groups and not engine.requests and not engine.has_unfinished()
    return idle and blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("spec", list(SPECS))
def test_engine_state_machine(llama, tmp_path, spec):
    config = SPECS[spec]
    if spec == "draft":
        config = {**config, "model": str(write_layer_skip_draft(llama, tmp_path / "draft", 1))}

    def make() -> Engine:
        return Engine.from_args(
            str(llama),
            block_size=4,
            num_kv_blocks=16,  # 64 tokens, one max_model_len request: requests of up to 55 tokens preempt
            max_model_len=64,
            max_num_seqs=4,
            max_num_batched_tokens=16,
            speculative_config=config,
        )

    engines = [make()]

    def machine() -> EngineMachine:
        if not _clean(engines[-1]):  # a failed example left requests behind: shrink on a fresh engine
            engines.append(make())
        return EngineMachine(engines[-1])

    run_state_machine_as_test(
        machine, settings=settings(max_examples=10, stateful_step_count=30, derandomize=True, database=None)
    )
    engine = engines[-1]
    # The runs reached what the machine is for: preemption, cached prefixes and (when on) verified drafts.
    seen = f"{len(engines)} engine(s), {engine.num_steps} steps, {engine.num_preemptions} preemptions"
    assert engine.num_preemptions > 0 and engine.blocks.prefix_cache.hit_tokens > 0, seen
    assert spec == "off" or engine.spec.verify_steps > 0
