"""Penalties, logit_bias and min_tokens change exactly the logits they should."""

import torch

from meshserve.engine.logits_processors import process_logits
from meshserve.engine.request import Request
from meshserve.engine.sampling_params import SamplingParams

EOS = 2


def request(prompt: list[int], output: list[int], **params) -> Request:
    r = Request("r", prompt, SamplingParams(**params), max_tokens=100)
    r.token_ids += output
    return r


def test_rows_without_processors_are_untouched():
    logits = torch.randn(2, 8)
    out = process_logits(logits, [request([1], [3]), request([1], [4], temperature=0)], [EOS])
    assert torch.equal(out, logits)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 8)
    r = request([5], [3, 3, 4], frequency_penalty=0.5, presence_penalty=1.0)
    out = process_logits(logits, [r], [EOS])[0]
    assert out[3] == -(0.5 * 2 + 1.0) and out[4] == -(0.5 + 1.0)
    assert out[5] == 0 and out[0] == 0  # prompt tokens are not penalised by these two


def test_repetition_penalty_shrinks_seen_logits_towards_zero_side():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    r = request([0], [1], repetition_penalty=2.0)
    out = process_logits(logits, [r], [EOS])[0]
    assert out.tolist() == [1.0, -4.0, 2.0, 1.0]


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(2, 8)
    early = request([1], [4], min_tokens=3, stop_token_ids=[6], logit_bias={7: 5.0})
    done = request([1], [4, 4, 4], min_tokens=3, stop_token_ids=[6])
    out = process_logits(logits, [early, done], [EOS])
    assert out[0, EOS] == out[0, 6] == float("-inf") and out[0, 7] == 5.0
    assert torch.equal(out[1], torch.zeros(8))
    assert torch.equal(logits, torch.zeros(2, 8))  # the input is not modified
