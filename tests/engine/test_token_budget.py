"""The TPOT target: the step-time model learns a + b * tokens, the budget shrinks to fit the target, and
the tokens a request gets do not change."""

from __future__ import annotations

import pytest

from meshserve.engine import Engine, SamplingParams
from meshserve.engine.token_budget import MIN_PREFILL_CHUNK, StepTimeModel, TokenBudget
from meshserve.errors import InputError


def test_the_step_time_model_recovers_a_and_b():
    model = StepTimeModel()
    assert model.fit() is None
    for tokens in [4, 300, 5, 6, 200, 4, 512, 7] * 3:
        model.observe(tokens, 0.005 + 0.0001 * tokens)
    a, b = model.fit()
    assert a == pytest.approx(0.005) and b == pytest.approx(0.0001)


def test_alike_steps_leave_the_budget_at_the_maximum():
    budget = TokenBudget(10.0, 2048)
    for _ in range(10):
        budget.observe(8, 0.02)  # one size only: a and b cannot be told apart
    assert budget.tokens(8) == 2048


def test_the_budget_shrinks_as_the_target_tightens_and_keeps_a_floor():
    def budget_for(target_ms: float, running: int = 4) -> int:
        budget = TokenBudget(target_ms, 2048)
        for tokens in [4, 300, 4, 600, 4, 150] * 4:
            budget.observe(tokens, 0.005 + 0.0001 * tokens)
        return budget.tokens(running)

    assert budget_for(15.0) == 100  # (15 ms - 5 ms) / 0.1 ms per token
    assert budget_for(55.0) == 500
    assert budget_for(1000.0) == 2048  # capped at max_num_batched_tokens
    assert budget_for(1.0, running=40) == 40 + MIN_PREFILL_CHUNK  # the decodes and a prefill still move
    assert TokenBudget(None, 2048).tokens(4) == 2048


def test_a_tight_target_chunks_a_late_prompt_and_the_tokens_stay_exact(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1] + list(range(10, 30)), [1, 5, 6], [1] + list(range(40, 140))]

    def run(**args) -> tuple[list[list[int]], list[tuple[int, int]]]:
        engine = Engine.from_args(model, max_model_len=256, block_size=4, max_num_batched_tokens=256, **args)
        # Steps take 5 ms + 1 ms per token (a slow machine, and the same on every run of the test).
        observe = engine.scheduler.budget.observe
        engine.scheduler.budget.observe = lambda tokens, seconds: observe(tokens, 0.005 + 0.001 * tokens)
        ids = [engine.add_request(p, params) for p in prompts[:2]]
        tokens, steps = {}, []
        while engine.has_unfinished():
            if engine.num_steps == 4:  # the long prompt arrives while the others decode
                ids.append(engine.add_request(prompts[2], params))
            tokens.update({o.request_id: o.token_ids for o in engine.step()})
            steps.append((engine.last_stats["budget"], engine.last_stats["tokens"]["prefill"]))
        engine.close()
        return [tokens[i] for i in ids], steps

    free, free_steps = run()
    tight, tight_steps = run(tpot_target_ms=10.0)  # 5 tokens fit, the floor is above
    assert tight == free
    late_free = [p for _, p in free_steps[4:] if p]
    assert len(late_free) == 1 and late_free[0] >= 100  # without a target: the whole prompt in one step
    late = [(b, p) for b, p in tight_steps[4:] if p]
    assert len(late) > 1 and all(p <= b < 256 for b, p in late)  # chunked under the shrunk budget
    assert {b for b, _ in late} <= {MIN_PREFILL_CHUNK + 2, MIN_PREFILL_CHUNK + 3}  # the floor: decodes + 16


def test_a_target_that_is_not_a_positive_time_is_refused(tiny_model_dir):
    with pytest.raises(InputError, match="tpot_target_ms"):
        Engine.from_args(str(tiny_model_dir("llama")), tpot_target_ms=0)


def test_a_budget_held_too_small_grows_while_full_steps_end_under_the_target():
    budget = TokenBudget(30.0, 2048)
    budget.observe(256, 0.300)  # one slow prefill (the cores were busy): b looks like 1 ms per token
    for _ in range(5):
        budget.observe(8, 0.008)
    start = budget.tokens(8)
    assert start < 40
    sizes = []
    for _ in range(12):  # the machine is fast again: 5 ms + 0.05 ms per token
        n = budget.tokens(8)
        sizes.append(n)
        budget.observe(n, 0.005 + 0.00005 * n)
    assert sizes == sorted(sizes) and sizes[-1] > 5 * start  # each full, fast step let it grow
    assert budget.tokens(8) <= 500  # and it stops near the target: (30 - 5) / 0.05 tokens


def test_a_target_under_the_fixed_cost_keeps_steps_at_half_per_token_work():
    budget = TokenBudget(4.0, 2048)  # below a = 5 ms: no step size can meet it
    for tokens in [4, 300, 4, 600] * 4:
        budget.observe(tokens, 0.005 + 0.0001 * tokens)
    assert budget.tokens(4) == 50  # a / b: the step is 10 ms, half of it per-token work
