"""The engines AsyncLLM and LLM drive (one process, expert/data-parallel ranks, a prefill/decode pair) take
the same calls: a front door written against Engine works on each. A method that drifts (a parameter added
to one only) fails here, not in the engine thread of a server."""

from __future__ import annotations

import inspect

import pytest

from meshserve.engine.distributed.frontend import DistributedEngine
from meshserve.engine.engine import Engine
from meshserve.engine.pd.frontend import PDEngine

CALLED_BY_THE_FRONT_DOORS = ("add_request", "abort", "step", "has_unfinished")


def parameters(cls: type, name: str) -> list[tuple[str, object]]:
    params = list(inspect.signature(getattr(cls, name)).parameters.values())[1:]  # without self
    return [(p.name, p.default) for p in params]


@pytest.mark.parametrize("engine", [DistributedEngine, PDEngine], ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", CALLED_BY_THE_FRONT_DOORS)
def test_every_engine_takes_the_calls_engine_takes(engine, method):
    assert parameters(engine, method) == parameters(Engine, method)
