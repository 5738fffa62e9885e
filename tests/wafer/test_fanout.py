"""Independent runs fan out in argument order (the Ray path is exercised by test_sweep's ray test)."""

import pytest

from meshserve.errors import InputError
from meshserve.wafer.fanout import largest_first, run_many


def test_results_come_back_in_argument_order():
    assert run_many(lambda x: x * x, [3, 1, 2], progress=False) == [9, 1, 4]


def test_processes_give_the_local_results_in_argument_order():
    args = [5, -3, 2, 0, 7]
    assert run_many(abs, args, executor="processes", progress=False) == run_many(abs, args, progress=False)


def test_unknown_executor_names_the_field():
    with pytest.raises(InputError, match="executor"):
        run_many(abs, [1], executor="dask", progress=False)


def _refuse(x: int) -> int:
    raise InputError("x", f"must be even, got {x}")


def test_an_input_error_in_a_worker_reaches_the_caller_as_itself():
    with pytest.raises(InputError, match="x: must be even, got 3") as caught:
        run_many(_refuse, [3], executor="processes", progress=False)
    assert caught.value.field == "x"


def test_processes_start_the_largest_runs_first_and_answer_in_argument_order():
    args = [1, 30, 2, 20, 2]
    assert largest_first(args, float) == [1, 3, 2, 4, 0] and largest_first(args, None) == [0, 1, 2, 3, 4]
    assert run_many(abs, args, executor="processes", progress=False, size=float) == args
