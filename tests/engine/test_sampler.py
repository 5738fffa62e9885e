"""Sampler: greedy, top-k / top-p filtering, seeded draws that ignore the batch, logprobs."""

import math

import pytest
import torch

from meshserve.engine.sampler import Sampler
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import InputError


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = logits_rows(4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
              SamplingParams(temperature=1e-4)]
    out = Sampler()(logits, params, [None] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_request_gets_the_same_tokens_whatever_the_batch():
    target = logits_rows(1, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=123)

    def draws(batch_size: int, position: int, sampler_seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(123)
        others = logits_rows(batch_size, seed=batch_size)
        rows = torch.cat([others[:position], target, others[position:]])
        ps = [SamplingParams(temperature=0.7)] * batch_size
        ps.insert(position, params)
        gens: list = [None] * batch_size
        gens.insert(position, gen)
        sampler = Sampler(seed=sampler_seed)
        return [sampler(rows, ps, gens).token_ids[position] for _ in range(20)]

    alone = draws(0, 0, 0)
    assert draws(5, 2, 1) == alone and draws(9, 9, 7) == alone
    assert len(set(alone)) > 1  # it really samples


def test_samples_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=0)
    n = 4000
    params = [SamplingParams(top_p=0.8)] * n  # keeps tokens 0 and 1 (0.5 + 0.3 reaches 0.8)
    counts = torch.bincount(torch.tensor(sampler(logits.expand(n, 4), params, [None] * n).token_ids),
                            minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / n - 0.5 / 0.8) < 0.03
    params = [SamplingParams(top_k=3, temperature=2.0)] * n
    counts = torch.bincount(torch.tensor(sampler(logits.expand(n, 4), params, [None] * n).token_ids),
                            minlength=4)
    expected = torch.tensor([0.5, 0.3, 0.15]).sqrt()
    assert counts[3] == 0 and torch.allclose(counts[:3] / n, expected / expected.sum(), atol=0.03)


def test_logprobs_of_top_n_and_of_the_sampled_token():
    logits = logits_rows(2)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    out = Sampler()(logits, params, [None, None])
    top = out.logprobs[0]
    expected = logits[0].log_softmax(-1)
    assert len(top) == 3 and out.token_ids[0] in top
    for token, value in top.items():
        assert math.isclose(value, expected[token].item(), rel_tol=1e-5)
    assert out.logprobs[1] is None


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 99}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": 1.5}, "seed"),
    ({"temperature": "hot"}, "temperature"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
