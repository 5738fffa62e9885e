"""Run independent simulations one after another, or fanned out over Ray (the optional ``ray`` extra).

Used by `meshserve wafer sweep` and `reproduce balance`: each run is a pure function of its
arguments, so results come back in argument order whichever executor ran them. Each run uses one
BLAS thread (unless OMP_NUM_THREADS says otherwise): the simulator multiplies small matrices, and
on a shared 2-core machine a second BLAS thread only spins (one dispatch's link loads: 1.6 ms on
one thread, 56-64 ms on the default two, at load average 10).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from meshserve.errors import InputError, require

EXECUTORS = ("local", "processes", "ray")
T = TypeVar("T")


def run_many(
    fn: Callable[[Any], T],
    args: Sequence[Any],
    executor: str = "local",
    progress: bool = True,
    label: str = "runs",
    size: Callable[[Any], float] | None = None,
) -> list[T]:
    """``[fn(a) for a in args]`` with a progress bar.

    executor: ``local`` runs them one after another in this process; ``processes`` on one worker
    process per core this process may use (``fn`` and the args must pickle; each worker keeps its
    own caches); ``ray`` as Ray tasks. size: a rough cost of each run; the processes executor
    starts the largest first, so the runs left at the end are short and no core idles long.
    """
    require(executor in EXECUTORS, "executor", f"unknown {executor!r}; allowed: {', '.join(EXECUTORS)}")
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{label} ({executor})", total=len(args))
        if executor == "local":
            out = []
            for a in args:
                out.append(one_blas_thread(fn, a))
                bar.advance(task)
            return out
        if executor == "processes":
            return _in_processes(fn, args, lambda: bar.advance(task), size)
        try:
            import ray
        except ImportError:
            raise InputError("executor", "ray is not installed; pip install 'meshserve[ray]'") from None
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        remote = ray.remote(one_blas_thread)
        pending = {remote.remote(fn, a): i for i, a in enumerate(args)}
        results: list[Any] = [None] * len(args)
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            results[pending[done[0]]] = ray.get(done[0])
            bar.advance(task)
        return results


def one_blas_thread(fn: Callable[[Any], T], arg: Any) -> T:
    """``fn(arg)`` on one BLAS thread, or on OMP_NUM_THREADS threads when that is set."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(os.environ.get("OMP_NUM_THREADS", 1)), user_api="blas"):
        return fn(arg)


def _in_processes(
    fn: Callable[[Any], T],
    args: Sequence[Any],
    tick: Callable[[], None],
    size: Callable[[Any], float] | None = None,
) -> list[T]:
    """``[fn(a) for a in args]`` on a pool of one process per usable core, in argument order,
    started largest ``size`` first (longest-processing-time first; ties in argument order).

    forkserver: workers start from a clean single-threaded server, not from this process (whose
    progress-bar thread could hold a lock at fork time).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = max(1, min(len(os.sched_getaffinity(0)), len(args)))
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(one_blas_thread, fn, args[i]): i for i in largest_first(args, size)}
        results: list[Any] = [None] * len(args)
        for done in as_completed(futures):
            results[futures[done]] = done.result()
            tick()
    return results


def largest_first(args: Sequence[Any], size: Callable[[Any], float] | None) -> list[int]:
    """Indices of ``args`` by ``size``, largest first (stable); argument order without a size."""
    if size is None:
        return list(range(len(args)))
    return sorted(range(len(args)), key=lambda i: -size(args[i]))
