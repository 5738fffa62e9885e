"""Scheduler: token budget, hybrid batches, preemption, FCFS and termination, with a fake model.

The fake "forward" just advances each work item and appends token 7 where a token is sampled, so
these tests exercise only the scheduling and block bookkeeping.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.config import SchedulerConfig
from meshserve.engine.kv_cache import BlockManager
from meshserve.engine.request import Request, RequestStatus
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.scheduler import Scheduler, SchedulerOutput, WorkKind


def make_scheduler(budget: int, max_seqs: int, num_blocks: int, block_size: int = 4) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        BlockManager(num_blocks, block_size),
    )


def request(prompt_len: int, max_tokens: int) -> Request:
    return Request(f"r{prompt_len}-{max_tokens}", [3] * prompt_len, SamplingParams(), max_tokens=max_tokens)


def fake_forward(scheduler: Scheduler, plan: SchedulerOutput) -> list[Request]:
    """Advance every item as a forward would; finish requests that reached max_tokens."""
    done = []
    for item in plan.items:
        scheduler.advance(item, item.num_logits)
        if item.num_logits:
            item.request.append_token(7)
            if item.request.num_output_tokens >= item.request.max_tokens:
                scheduler.finish(item.request, RequestStatus.FINISHED_LENGTH)
                done.append(item.request)
    return done


def check_step(scheduler: Scheduler, plan: SchedulerOutput) -> None:
    config, blocks = scheduler.config, scheduler.blocks
    assert 0 < plan.num_tokens <= config.max_num_batched_tokens
    assert len(scheduler.running) <= config.max_num_seqs
    assert len({id(it.request) for it in plan.items}) == len(plan.items), "one item per request"
    for item in plan.items:
        req = item.request
        assert req.status is RequestStatus.RUNNING and item.start == req.num_computed_tokens
        assert len(req.block_table) * blocks.block_size >= item.start + item.num_tokens
        assert item.start + item.num_tokens <= req.num_tokens
        assert item.num_logits == int(item.start + item.num_tokens == req.num_tokens)
    owned = [b for r in scheduler.running for b in r.block_table]
    assert len(owned) == len(set(owned))
    assert len(owned) + blocks.num_free_blocks == blocks.num_blocks, "blocks leaked"
    assert all(not r.block_table for r in scheduler.waiting)


@settings(max_examples=40, deadline=None)
@given(
    budget=st.integers(4, 64),
    max_seqs=st.integers(1, 4),
    num_blocks=st.integers(8, 40),
    reqs=st.lists(
        st.tuples(st.integers(1, 30), st.integers(1, 12), st.integers(0, 6)), min_size=1, max_size=12
    ),
)
def test_every_request_finishes_within_budget_and_no_block_leaks(budget, max_seqs, num_blocks, reqs):
    scheduler = make_scheduler(budget, max_seqs, num_blocks)
    max_len = num_blocks * scheduler.blocks.block_size  # one request always fits the whole cache
    pending = [(min(p, max_len - 1), min(m, max_len - min(p, max_len - 1)), at) for p, m, at in reqs]
    pending.sort(key=lambda r: r[2])
    admitted_order, finished = [], []
    step = 0
    while pending or scheduler.has_unfinished():
        while pending and pending[0][2] <= step:  # requests arrive over time
            p, m, _ = pending.pop(0)
            scheduler.add(request(p, m))
        step += 1
        assert step < 2000, "a request starved"
        if not scheduler.has_unfinished():
            continue
        plan = scheduler.schedule()
        check_step(scheduler, plan)
        admitted_order += [
            it.request for it in plan.items if it.start == 0 and not it.request.num_preemptions
        ]
        finished += fake_forward(scheduler, plan)
    assert len(finished) == len(reqs)
    assert all(r.num_output_tokens == r.max_tokens for r in finished)
    assert scheduler.blocks.num_free_blocks == num_blocks and not any(scheduler.blocks.ref_counts)
    # FCFS: requests start in arrival order.
    assert [r.arrival_order for r in admitted_order] == sorted(r.arrival_order for r in admitted_order)


def test_prefill_chunks_and_decodes_share_a_step():
    scheduler = make_scheduler(budget=16, max_seqs=4, num_blocks=64)
    first = request(10, 5)
    scheduler.add(first)
    fake_forward(scheduler, scheduler.schedule())  # whole prompt in one step, first token sampled
    second = request(40, 5)
    scheduler.add(second)
    plan = scheduler.schedule()
    kinds = [(it.request, it.kind, it.num_tokens) for it in plan.items]
    assert kinds == [(first, WorkKind.DECODE, 1), (second, WorkKind.PREFILL, 15)]
    assert plan.items[1].num_logits == 0  # mid-prompt chunk: no token sampled
    fake_forward(scheduler, plan)
    plan = scheduler.schedule()  # the long prompt goes on in chunks next to the decode
    assert [(it.kind, it.start, it.num_tokens) for it in plan.items] == [
        (WorkKind.DECODE, 11, 1),
        (WorkKind.PREFILL, 15, 15),
    ]


def test_preemption_evicts_the_latest_arrival_and_recomputes_it():
    scheduler = make_scheduler(budget=32, max_seqs=4, num_blocks=6, block_size=4)
    old, new = request(8, 12), request(8, 12)
    scheduler.add(old)
    scheduler.add(new)
    preempted = []
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        check_step(scheduler, plan)
        preempted += plan.preempted
        fake_forward(scheduler, plan)
    assert preempted and all(r is new for r in preempted)
    assert old.num_preemptions == 0 and new.num_output_tokens == 12


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(budget=64, max_seqs=2, num_blocks=64)
    for _ in range(5):
        scheduler.add(request(4, 3))
    plan = scheduler.schedule()
    assert len(plan.items) == 2 and len(scheduler.waiting) == 3


def test_verify_items_take_drafts_within_budget():
    scheduler = make_scheduler(budget=4, max_seqs=2, num_blocks=16)
    req = request(3, 8)
    scheduler.add(req)
    fake_forward(scheduler, scheduler.schedule())
    req.spec_token_ids = [5, 6, 7, 8, 9]
    (item,) = scheduler.schedule().items
    assert item.kind is WorkKind.VERIFY and item.num_tokens == item.num_logits == 4  # drafts trimmed
    assert req.query_tokens(item.start, item.num_tokens) == [7, 5, 6, 7]
    scheduler.advance(item, 2)  # last token + 1 accepted draft keep their KV
    assert req.num_computed_tokens == item.start + 2 and req.spec_token_ids == []


def test_abort_frees_blocks_at_once():
    scheduler = make_scheduler(budget=16, max_seqs=2, num_blocks=8)
    req = request(12, 4)
    scheduler.add(req)
    scheduler.schedule()
    assert scheduler.blocks.num_free_blocks == 5
    scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
    assert scheduler.blocks.num_free_blocks == 8 and not scheduler.has_unfinished()
