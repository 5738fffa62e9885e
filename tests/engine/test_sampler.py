"""Sampler: greedy, top-k / top-p filtering, seeded draws that ignore the batch, logprobs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kstest

from meshserve.engine.draws import exponentials
from meshserve.engine.sampler import sample
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = logits_rows(4)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(temperature=1e-4),
    ]
    out = sample(logits, params, [0, 1, 2, 3], [0] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_request_gets_the_same_tokens_whatever_the_batch():
    target = logits_rows(1, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=123)

    def draws(batch_size: int, position: int, others_seed: int) -> list[int]:
        others = logits_rows(batch_size, seed=batch_size)
        rows = torch.cat([others[:position], target, others[position:]])
        ps = [SamplingParams(temperature=0.7)] * batch_size
        ps.insert(position, params)
        seeds = [others_seed + i for i in range(batch_size)]
        seeds.insert(position, 123)
        return [sample(rows, ps, seeds, [t] * len(seeds)).token_ids[position] for t in range(20)]

    alone = draws(0, 0, 0)
    assert draws(5, 2, 1) == alone and draws(9, 9, 7) == alone
    assert len(set(alone)) > 1  # it really samples


def test_samples_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 4000
    params = [SamplingParams(top_p=0.8)] * n  # keeps tokens 0 and 1 (0.5 + 0.3 reaches 0.8)
    first = [0] * n  # n requests' first tokens
    counts = torch.bincount(
        torch.tensor(sample(logits.expand(n, 4), params, range(n), first).token_ids), minlength=4
    )
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / n - 0.5 / 0.8) < 0.03
    params = [SamplingParams(top_k=3, temperature=2.0)] * n
    counts = torch.bincount(
        torch.tensor(sample(logits.expand(n, 4), params, range(n), first).token_ids), minlength=4
    )
    expected = torch.tensor([0.5, 0.3, 0.15]).sqrt()
    assert counts[3] == 0 and torch.allclose(counts[:3] / n, expected / expected.sum(), atol=0.03)


def test_logprobs_of_top_n_and_of_the_sampled_token():
    logits = logits_rows(2)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    out = sample(logits, params, [0, 1], [0, 0])
    top = out.logprobs[0]
    expected = logits[0].log_softmax(-1)
    assert len(top) == 3 and out.token_ids[0] in top
    for token, value in top.items():
        assert math.isclose(value, expected[token].item(), rel_tol=1e-5)
    assert out.logprobs[1] is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
        ({"seed": 1 << 64}, "seed"),
        ({"seed": True}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": [None]}, "stop"),
        ({"max_tokens": True}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 2.0}, "n"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"7": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logprobs": 1.0}, "logprobs"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value) and "must" in err.value.message


def test_sampling_params_accept_the_edges():
    SamplingParams(
        seed=(1 << 64) - 1,
        n=64,
        min_p=1.0,
        presence_penalty=-2,
        logit_bias={"5": -100, 6: 100.0},
        min_tokens=16,
        max_tokens=16,
        stop=("a", "b"),
    )


NEIGHBOURS = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    top_k=st.sampled_from([0, 1, 5]),
    min_p=st.sampled_from([0.0, 0.1]),
    seed=st.one_of(st.none(), st.integers(0, 1000)),
)


@settings(max_examples=60, deadline=None)
@given(
    target=NEIGHBOURS,
    neighbours=st.lists(NEIGHBOURS, max_size=6),
    position=st.integers(0, 6),
    seed=st.integers(0, 2**32),
)
def test_seeded_row_ignores_any_mix_of_neighbours(target, neighbours, position, seed):
    """A seeded row's filtering and draw depend on its own params only, whatever the others ask for."""
    target = SamplingParams(
        temperature=target.temperature or 1.0,
        top_p=target.top_p,
        top_k=target.top_k,
        min_p=target.min_p,
        seed=seed,
    )
    position = min(position, len(neighbours))
    row = logits_rows(1, seed=seed % 97)

    def run(others: list[SamplingParams], at: int) -> list[int]:
        rows = torch.cat([logits_rows(at, seed=1), row, logits_rows(len(others) - at, seed=2)])
        params = others[:at] + [target] + others[at:]
        seeds = [len(others) + i if p.seed is None else p.seed for i, p in enumerate(params)]
        seeds[at] = seed
        return [sample(rows, params, seeds, [t] * len(params)).token_ids[at] for t in range(5)]

    assert run(neighbours, position) == run([], 0)


def test_min_p_drops_tokens_far_below_the_top():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.08, 0.02]]))
    n = 3000
    tokens = sample(logits.expand(n, 4), [SamplingParams(min_p=0.2)] * n, range(n), [0] * n).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=4)
    assert counts[2] == counts[3] == 0 and abs(counts[0] / n - 2 / 3) < 0.03


def test_draws_are_exponential_and_keyed_by_seed_and_position_only():
    n = 20000
    by_position = exponentials([42] * n, range(n), 3).double().numpy()
    by_seed = exponentials(range(-n // 2, n // 2), [3] * n, 3).double().numpy()
    for e in (by_position, by_seed, by_position.T):  # Exp(1) by position, seed and token: Kolmogorov-Smirnov
        assert e.min() > 0 and kstest(e.ravel(), "expon").pvalue > 1e-3
    assert torch.equal(exponentials([42, 7], [5, 5], 9)[:1], exponentials([42], [5], 9))  # (seed, position)
    assert torch.equal(exponentials([(1 << 64) - 1], [0], 4), exponentials([-1], [0], 4))  # 64 bits, any sign
