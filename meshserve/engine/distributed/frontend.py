"""DistributedEngine: the Engine interface over N ranks (data-parallel attention, EP MoE).

The front end starts the ranks (processes.py: spawned here; torchrun.py: started by torchrun, this
process being rank 0), deals each request to the rank with the fewest unfinished ones, and steps all
ranks together. A rank that fails to start or dies mid-step shuts every rank down and raises RankError
(no orphan processes, no silent hang). Bad input raised on a rank comes back as InputError.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshserve.config import EngineConfig, available_cores
from meshserve.engine.device import resolve_device
from meshserve.engine.distributed.config import ParallelConfig
from meshserve.engine.distributed.expert_map import spread_placement, validate_placement
from meshserve.engine.distributed.processes import SpawnedRanks
from meshserve.engine.distributed.ranks import RankError, Ranks
from meshserve.engine.distributed.torchrun import TorchrunRanks, serve_rank, torchrun_launch
from meshserve.engine.distributed.worker import RankSpec
from meshserve.engine.outputs import RequestOutput
from meshserve.engine.sampling_params import SamplingParams
from meshserve.errors import require
from meshserve.models.config import ModelConfig, dtype_name
from meshserve.models.loader import load_config
from meshserve.traces import ExpertTrace

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0


def expert_placement(parallel: ParallelConfig, mc: ModelConfig) -> np.ndarray | None:
    """The initial holds[moe_layer, expert, rank], or None when the MoE layers are not split."""
    if not (parallel.enable_expert_parallel and mc.is_moe):
        return None
    n = parallel.data_parallel_size
    require(
        n <= mc.num_experts,
        "data_parallel_size",
        f"expert parallelism needs at least one expert per rank: {n} ranks > {mc.num_experts} experts",
    )
    if parallel.expert_placement is None:
        redundant = parallel.eplb_config.num_redundant_experts
        return spread_placement(mc.num_moe_layers, mc.num_experts, n, redundant)
    return validate_placement(parallel.expert_placement, mc.num_moe_layers, mc.num_experts, n)


def start_ranks(spec: RankSpec, oversubscribe: bool = False) -> Ranks:
    """Spawn the ranks here, or, under torchrun, join its launch: rank 0 returns, the others serve rank
    0's commands and leave the process when it closes (they never return)."""
    launch = torchrun_launch()
    if launch is None:
        cores = available_cores()
        require(
            spec.world_size <= cores or oversubscribe,
            "data_parallel_size",
            f"{spec.world_size} rank processes on {cores} cores: at most {cores} "
            "(oversubscribe=True / --oversubscribe starts them anyway)",
        )
        return SpawnedRanks(spec)
    require(
        launch.world_size == spec.world_size,
        "data_parallel_size",
        f"must equal torchrun's WORLD_SIZE ({launch.world_size}) when torchrun starts the ranks, "
        f"got {spec.world_size}",
    )
    spec = dataclasses.replace(
        spec.for_rank(launch.rank, "env://", launch.local_rank),
        threads=max(1, available_cores() // launch.local_world_size),
    )
    if launch.rank == 0:
        return TorchrunRanks(spec)
    serve_rank(spec)
    raise SystemExit(0)


class DistributedEngine:
    """``add_request`` / ``step`` / ``abort`` / ``has_unfinished`` / ``close`` over N rank processes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parallel = config.parallel
        self.model_config, self.tokenizer = load_config(
            config.model, config.dtype, config.revision, config.quantization, config.quantize_lm_head
        )
        require(
            config.record_expert_trace is None or self.model_config.is_moe,
            "record_expert_trace",
            f"model {self.model_config.name} ({self.model_config.arch}) has no MoE layers to trace",
        )
        holds = expert_placement(parallel, self.model_config)
        eplb = parallel.eplb_config if parallel.enable_eplb and holds is not None else None
        self.num_ranks = n = parallel.data_parallel_size
        self.step_timeout_s = parallel.step_timeout_s
        # Each rank is a single-process engine, speculative decoding included (drafts per rank); the
        # expert trace is recorded here, from every rank's loads.
        resolve_device(config.device)  # no CUDA here: InputError before any rank starts
        require(
            config.device == "cpu" or config.switches["MESHSERVE_CUDA_EP"] == "nccl",
            "device",
            "several ranks on cuda run the expert-parallel path over NCCL, which has not run on a GPU yet "
            "(README: GPU paths); set MESHSERVE_CUDA_EP=nccl to run it anyway",
        )
        single = EngineConfig(
            config.model,
            config.dtype,
            config.seed,
            config.revision,
            quantization=config.quantization,
            quantize_lm_head=config.quantize_lm_head,
            device=config.device,
            cache=config.cache,
            scheduler=config.scheduler,
            speculative_config=config.speculative_config,
            switches=config.switches,
        )
        threads = max(1, available_cores() // n)
        spec = RankSpec(
            0,
            n,
            0,
            "",
            single,
            holds,
            eplb,
            threads,
            parallel.step_timeout_s,
            record_counts=config.record_expert_trace is not None,
            dispatch=parallel.ep_dispatch,
        )
        self.ranks = start_ranks(spec, parallel.oversubscribe)
        started = self.ranks.started(START_TIMEOUT_S)[0]
        self.max_model_len, self.draft_moe_layers = started.max_model_len, started.draft_moe_layers
        self.expert_weight_bytes = started.expert_weight_bytes  # the same on every rank: one packed layout
        self.tokenizer.bound_prompt_chars(self.max_model_len)  # LLM.chat tokenizes here
        self.owner: dict[str, int] = {}  # unfinished request -> its rank
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_stats: dict[str, Any] = {}
        self.migrations: list[dict[str, Any]] = []  # one record per live migration (see eplb.py)
        self._expert_counts: list[np.ndarray] = []  # per step with a forward: [moe_layer, expert], all ranks
        # What the HTTP server reads of an Engine, summed over the ranks at every step.
        self._added = 0
        self.num_preemptions = 0
        self.blocks = RankBlocks()
        self.spec = None
        logger.info(
            "distributed engine: %d ranks, expert parallel %s, EPLB %s",
            n,
            holds is not None,
            eplb is not None,
        )

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
        detokenize: bool = True,
        arrival: float | None = None,
    ) -> str:
        """Queue a prompt on the least-busy rank; returns its request id. Bad input raises InputError.

        ``stream``, ``detokenize``, ``arrival``: as Engine.add_request's (the ranks share one host's
        monotonic clock).
        """
        if request_id is None:
            request_id = next(i for i in map(str, self._ids) if i not in self.owner)
        request_id = str(request_id)
        require(request_id not in self.owner, "request_id", f"{request_id!r} is already in use")
        busy = np.bincount(np.fromiter(self.owner.values(), dtype=np.int64), minlength=self.num_ranks)
        rank = int(busy.argmin())
        self._call(rank, "add", (prompt, params, request_id, stream, detokenize, arrival))
        self.owner[request_id] = rank
        self._added += 1
        return request_id

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """As Engine.abort; a request stays owned until it is aborted whole (or finishes)."""
        request_id = str(request_id)
        rank = self.owner.pop(request_id, None) if index is None else self.owner.get(request_id)
        if rank is None or self.closed:  # after a RankError there is nothing left to abort
            return False
        return bool(self._call(rank, "abort", (request_id, index)))

    @property
    def closed(self) -> bool:
        return self.ranks.closed

    def has_unfinished(self) -> bool:
        return bool(self.owner)

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled on any rank (as of the last step, plus those added since)."""
        return self.last_stats.get("waiting", 0) + self._added

    def step(self) -> list[RequestOutput]:
        """One lock-step step of every rank; its outputs (final ones, and deltas of streamed requests)."""
        outputs: list[RequestOutput] = []
        infos = []
        for outs, info in self._call(list(range(self.num_ranks)), "step", ()):
            outputs.extend(outs)
            infos.append(info)
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        self.num_steps += 1
        self._added = 0
        self.last_stats = {
            "step": self.num_steps,
            "step_s": [i["step_s"] for i in infos],
            **summed_stats([i["stats"] for i in infos]),
        }
        self.num_preemptions = sum(i["preemptions"] for i in infos)
        self.blocks.prefix_cache = summed_prefix_cache([i["prefix_cache"] for i in infos])
        if "routed" in infos[0]:  # expert-parallel: what each rank's experts computed
            self.last_stats["routed"] = np.array([i["routed"] for i in infos])  # [rank, moe_layer]
        if "counts" in infos[0]:  # what every rank's routers sent to each expert, [layer, expert]
            self.last_stats["expert_counts"] = counts = np.sum([i["counts"] for i in infos], axis=0)
            if self.config.record_expert_trace is not None and any(i["forward"] for i in infos):
                if self.draft_moe_layers:  # the draft's own MoE after the main layers, as Engine records it
                    counts = np.concatenate((counts, np.sum([i["draft_counts"] for i in infos], axis=0)))
                self._expert_counts.append(counts)
        for record in (r for r in infos[0].get("eplb", []) if r.get("final")):
            self.migrations.append(record)
            if record.get("error"):
                logger.error("%s", record["error"])  # it says the old placement keeps serving
        return outputs

    def expert_trace(self) -> ExpertTrace | None:
        """Tokens routed per expert, summed over the ranks, for every step some rank ran (None when not
        recording): the single-process engine's trace format, which the simulator replays."""
        if self.config.record_expert_trace is None:
            return None
        mc, sched = self.model_config, self.config.scheduler
        counts = (
            np.stack(self._expert_counts)
            if self._expert_counts
            else np.zeros((0, mc.num_moe_layers + self.draft_moe_layers, mc.num_experts), dtype=np.int64)
        )
        meta = {
            "dtype": dtype_name(self.model_config.dtype),
            "seed": self.config.seed,
            "arch": mc.arch,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "max_num_seqs": sched.max_num_seqs,
            "data_parallel_size": self.num_ranks,
        }
        if self.expert_weight_bytes is not None:  # as Engine.expert_trace: the simulator charges packed bytes
            meta["expert_weight_bytes"] = self.expert_weight_bytes
        draft = self.draft_moe_layers
        return ExpertTrace(
            counts=counts, model=mc.name, top_k=mc.top_k, source="engine", meta=meta, draft_layers=draft
        )

    def holds(self) -> np.ndarray | None:
        """The expert placement the ranks serve now (rank 0's view; all ranks switch together)."""
        return self._call(0, "holds", ())

    # -- plumbing ---------------------------------------------------------------------------------

    def _call(self, ranks: int | list[int], command: str, args: tuple) -> Any:
        """The answer of one rank (an int), or of each listed rank."""
        if self.closed:
            raise RankError("the engine's ranks have been shut down")
        if isinstance(ranks, int):
            return self.ranks.ask([ranks], command, args, self.step_timeout_s)[0]
        return self.ranks.ask(ranks, command, args, self.step_timeout_s)

    def close(self) -> None:
        """Ask every live rank to finish, then make sure none is left running."""
        if self.closed:
            return
        self.ranks.close()
        trace = self.expert_trace()
        if trace is not None:
            trace.save(self.config.record_expert_trace)
            logger.info("expert trace: %d steps -> %s", trace.num_steps, self.config.record_expert_trace)


@dataclass
class RankBlocks:
    """The ranks' KV block managers as the server's metrics see them: only the summed prefix cache."""

    prefix_cache: SummedPrefixCache | None = None


@dataclass
class SummedPrefixCache:
    queried_tokens: int
    hit_tokens: int

    def stats(self) -> dict[str, float]:
        rate = self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
        return {"queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens, "hit_rate": rate}


def summed_prefix_cache(stats: list[dict[str, float] | None]) -> SummedPrefixCache | None:
    if stats[0] is None:
        return None
    return SummedPrefixCache(sum(s["queried_tokens"] for s in stats), sum(s["hit_tokens"] for s in stats))


def summed_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's Engine.last_stats of every rank as one engine's: counts summed, KV usage averaged."""
    total: dict[str, Any] = {
        key: sum(s.get(key, 0) for s in stats) for key in ("num_seqs", "running", "waiting", "preempted")
    }
    total["kv_usage"] = float(np.mean([s.get("kv_usage", 0.0) for s in stats]))
    total["tokens"] = dict(sum((Counter(s.get("tokens", {})) for s in stats), Counter()))
    return total
