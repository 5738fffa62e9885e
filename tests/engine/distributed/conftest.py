"""The tiny Mixtral and its single-process greedy tokens, made once per test worker (settings: helpers.py)."""

from __future__ import annotations

import pytest

from meshserve.engine import LLM
from tests.engine.distributed.helpers import SINGLE, tokens


@pytest.fixture(scope="session")
def mixtral(tiny_model_dir) -> str:
    return str(tiny_model_dir("mixtral"))


@pytest.fixture(scope="session")
def expected(mixtral) -> list[list[int]]:
    """The single-process engine's greedy tokens for PROMPTS: what every rank count must reproduce."""
    with LLM(mixtral, **SINGLE) as llm:
        return tokens(llm)
