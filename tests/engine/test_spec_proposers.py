"""Proposers and speculative_config validation."""

from __future__ import annotations

import pytest

from meshserve.engine.spec import NgramProposer, SpecConfig, propose_ngram
from meshserve.errors import InputError


def test_ngram_proposes_what_followed_the_latest_occurrence() -> None:
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], k=3, n_max=4, n_min=1) == [4, 5, 1]
    # Two earlier "1 2": the later one (followed by 8) wins.
    assert propose_ngram([1, 2, 9, 1, 2, 8, 1, 2], k=3, n_max=2, n_min=1) == [8, 1, 2]
    # The longest n-gram decides: "3 1 2" only occurred before 7.
    assert propose_ngram([3, 1, 2, 7, 5, 1, 2, 6, 3, 1, 2], k=1, n_max=3, n_min=1) == [7]


def test_ngram_without_a_match_proposes_nothing() -> None:
    assert propose_ngram([1, 2, 3, 4], k=3, n_max=3, n_min=1) == []
    assert propose_ngram([5], k=3, n_max=3, n_min=1) == []
    assert propose_ngram([1, 2, 3, 1, 9], k=3, n_max=3, n_min=2) == []  # n=1 would match, but min is 2


def test_ngram_proposer_respects_per_request_limits() -> None:
    prop = NgramProposer(k=4, n_max=3, n_min=1)
    ctx = [1, 2, 3, 4, 5, 6, 1, 2]
    assert prop.propose([ctx, ctx, ctx], [10, 2, 0]) == [[3, 4, 5, 6], [3, 4], []]


def test_spec_config_vllm_vocabulary() -> None:
    cfg = SpecConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3})
    assert cfg is not None and cfg.num_speculative_tokens == 5 and cfg.prompt_lookup_min == 1
    assert SpecConfig.from_dict(None) is None
    draft = SpecConfig.from_dict({"method": "draft_model", "model": "/tmp/d", "num_speculative_tokens": 2})
    assert draft is not None and draft.model == "/tmp/d"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"method": "medusa"}, "speculative_config.method"),
        ({"num_speculative_tokens": 3}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2.5}, "speculative_config.num_speculative_tokens"),
        (
            {"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2},
            "speculative_config.prompt_lookup_min",
        ),
        ({"method": "draft_model"}, "speculative_config.model"),
        ({"method": "ngram", "model": "/x"}, "speculative_config.model"),
        ({"method": "ngram", "lookahead": 2}, "speculative_config.lookahead"),
        (
            {"method": "draft_model", "model": "/d", "draft_confidence": 1.0},
            "speculative_config.draft_confidence",
        ),
        ({"method": "ngram", "draft_confidence": 0.5}, "speculative_config.draft_confidence"),
        ("ngram", "speculative_config"),
    ],
)
def test_spec_config_rejects_bad_input(value: object, field: str) -> None:
    with pytest.raises(InputError) as err:
        SpecConfig.from_dict(value)  # type: ignore[arg-type]
    assert err.value.field == field
