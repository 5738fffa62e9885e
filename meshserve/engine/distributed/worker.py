"""One rank: a process group member running an ordinary Engine over its own requests.

The front end (engine/distributed/frontend.py) sends commands through a pipe (processes.py) or over
torch.distributed (torchrun.py); every rank gets every ``step``, so the ranks run their MoE layers'
all-to-alls in lock-step (a rank without work joins them with empty buffers). Anything that goes
wrong is sent back as ("error", exception) rather than left for the front end to discover by timing out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from meshserve import switches
from meshserve.config import EngineConfig
from meshserve.engine.device import process_group_backend, resolve_device
from meshserve.engine.distributed.config import EPLBConfig
from meshserve.engine.engine import Engine
from meshserve.errors import InputError
from meshserve.models.layers.quant_experts import expert_weight_bytes

# Fault injection for tests and drills: "start:R" fails rank R while starting, "stall:R" makes rank R
# never send its migration chunks (see eplb.py), "close:0" makes torchrun's rank 0 slow to close its ranks.
FAULT_ENV = "MESHSERVE_EP_FAULT"


def injected_fault(kind: str, rank: int) -> bool:
    return switches.value(FAULT_ENV) == f"{kind}:{rank}"


@dataclass
class RankSpec:
    """What one worker process needs to start."""

    rank: int
    world_size: int
    local_rank: int  # this rank's place on its host: its GPU with device="cuda"
    init_method: str  # torch.distributed rendezvous: file://PATH (spawned ranks) or env:// (torchrun)
    config: EngineConfig  # a single-process config: parallel settings stripped
    holds: np.ndarray | None  # expert placement; None = every rank holds every expert (dense or no EP)
    eplb: EPLBConfig | None
    threads: int
    timeout_s: float
    record_counts: bool = False  # report the router's expert counts every step (expert trace)
    dispatch: str = "even"  # ParallelConfig.ep_dispatch

    def for_rank(self, rank: int, init_method: str, local_rank: int | None = None) -> RankSpec:
        local = rank if local_rank is None else local_rank
        return dataclasses.replace(self, rank=rank, init_method=init_method, local_rank=local)


@dataclass(frozen=True)
class Started:
    """What a rank tells the front end once its engine is built."""

    max_model_len: int
    draft_moe_layers: (
        int  # its speculative draft's own MoE layers (DeepSeek's MTP), traced after the main ones
    )
    expert_weight_bytes: float | None  # bytes per expert weight of quantized experts (the rank holds them)


class RankWorker:
    """The engine of one rank and, with EP, its expert-parallel layers and live balancer."""

    def __init__(self, spec: RankSpec) -> None:
        if injected_fault("start", spec.rank):
            raise RuntimeError(f"injected start failure on rank {spec.rank} ({FAULT_ENV})")
        device = resolve_device(spec.config.device, spec.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the engine builds on the current device
        if not dist.is_initialized():  # torchrun.py joins first: its command group must come first
            join(spec)
        self.rank, self.record_counts = spec.rank, spec.record_counts
        # The rank's share of the cores: Engine sets torch's threads from its config, which defaults to all.
        self.engine = Engine(dataclasses.replace(spec.config, num_threads=spec.threads))
        self.ep = self.balancer = None
        if spec.holds is not None:
            from meshserve.engine.distributed.expert_parallel import ExpertParallel

            self.ep = ExpertParallel(self.engine.model, spec.holds, spec.rank, dispatch=spec.dispatch)
            if spec.eplb is not None:
                from meshserve.engine.distributed.eplb import LiveBalancer

                self.balancer = LiveBalancer(self.ep, spec.eplb, spec.rank, spec.world_size, spec.timeout_s)

    def step(self) -> tuple[list[Any], dict[str, Any]]:
        start = time.perf_counter()
        before = self.engine.num_steps
        finished = self.engine.step()
        if self.ep is not None and self.engine.num_steps == before:
            self.ep.idle()
        engine = self.engine
        prefix = engine.blocks.prefix_cache
        info: dict[str, Any] = {
            "forward": engine.num_steps > before,
            "stats": engine.last_stats if engine.num_steps > before else {"waiting": engine.num_waiting},
            "preemptions": engine.num_preemptions,
            "prefix_cache": None if prefix is None else prefix.stats(),
        }
        model = engine.model
        if self.ep is not None:
            info["routed"] = self.ep.received()
            info["counts"] = self.ep.counts()
        elif self.record_counts:  # data parallel only: this rank's whole MoE layers routed these
            mc = engine.model_config
            info["counts"] = (
                model.main_expert_counts().cpu().numpy().astype(np.int64)
                if info["forward"]
                else np.zeros((mc.num_moe_layers, mc.num_experts), dtype=np.int64)
            )
        if self.record_counts and model.draft_moe_layers:  # a draft's own MoE (the MTP layer): never sharded
            info["draft_counts"] = model.draft_expert_counts().cpu().numpy().astype(np.int64)
        if self.balancer is not None:
            info["eplb"] = self.balancer.after_step(info["counts"])
        info["step_s"] = time.perf_counter() - start
        return finished, info

    def handle(self, command: str, args: tuple) -> Any:
        """The answer to one front-end command ("step", "add", "abort", "holds")."""
        if command == "add":
            return self.engine.add_request(*args)
        if command == "abort":
            return self.engine.abort(*args)
        if command == "step":
            return self.step()
        if command == "holds":
            return None if self.ep is None else self.ep.holds
        raise ValueError(f"unknown command {command!r}")

    def close(self) -> None:
        self.engine.close()
        if self.balancer is not None:
            self.balancer.close()
        dist.destroy_process_group()

    def reply(self, command: str, args: tuple) -> tuple[str, Any]:
        """("ok", answer) or ("error", the exception as plain strings): what goes back to the front end."""
        try:
            return ("ok", self.handle(command, args))
        except BaseException as err:  # noqa: BLE001 - reported; the front end decides
            return ("error", portable(err))

    def between_steps(self, command_waiting: Callable[[], bool]) -> None:
        """Migration copies in the wait for the next command (see eplb.py)."""
        if self.balancer is not None:
            self.balancer.between_steps(command_waiting)


def join(spec: RankSpec) -> None:
    """Join the ranks' default process group: gloo on CPU, NCCL for CUDA tensors (engine/device.py)."""
    backend = process_group_backend(resolve_device(spec.config.device, spec.local_rank))
    # torch imports torch._dynamo, and with it torch.distributed's FSDP and sharded-tensor modules, the first
    # time a model is built on the meta device. Imported while a process group exists, they keep a reference
    # to it that destroy_process_group does not drop: its gloo threads outlive the engine, and the process
    # aborted in C++ at exit now and then ("terminate called without an active exception"). Import it first.
    import torch._dynamo  # noqa: F401

    dist.init_process_group(
        backend,
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.timeout_s),
    )


def start_worker(spec: RankSpec) -> tuple[RankWorker | None, tuple[str, Any]]:
    """This rank's worker and its start reply ("ready", Started); (None, ("error", ...)) when it could not
    start (every start failure goes back to the front end, which stops all ranks)."""
    try:
        worker = RankWorker(spec)
    except BaseException as err:  # noqa: BLE001 - reported, see above
        return None, ("error", portable(err))
    model = worker.engine.model
    started = Started(worker.engine.max_model_len, model.draft_moe_layers, expert_weight_bytes(model))
    return worker, ("ready", started)


def run_rank(spec: RankSpec, conn: Connection) -> None:
    """Process entry point: start, say ("ready", Started), then answer commands until "close" or EOF."""
    worker, start = start_worker(spec)
    conn.send(start)
    if worker is None:
        return
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):  # the front end is gone: leave, do not linger as an orphan
            return
        if command == "close":
            try:
                worker.close()
            finally:
                conn.send(("ok", None))
            return
        reply = worker.reply(command, args)
        conn.send(reply)
        if command == "step" and reply[0] == "ok":
            worker.between_steps(conn.poll)


def portable(err: BaseException) -> tuple[str, ...]:
    """An exception as plain strings: ("input", field, message) for InputError, else ("other", text)."""
    if isinstance(err, InputError):
        return ("input", err.field, err.message)
    return ("other", f"{type(err).__name__}: {err}")
