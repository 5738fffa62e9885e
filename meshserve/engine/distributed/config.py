"""Parallel settings with vLLM's names: data-parallel ranks, expert parallelism, EPLB and its knobs.

LLM(model, data_parallel_size=4, enable_expert_parallel=True, enable_eplb=True,
    eplb_config={"window_size": 8, "step_interval": 8, "num_redundant_experts": 2,
                 "balancer": "greedy", "mode": "non-invasive"})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshserve.engine.distributed.balanced import EP_DISPATCH
from meshserve.errors import InputError, require

BALANCER_NAMES = ("greedy", "topology", "ni")
MIGRATION_MODES = ("invasive", "non-invasive")


@dataclass
class EPLBConfig:
    """Expert load balancing while serving (vLLM ``--eplb-config``, plus ``balancer`` and ``mode``).

    window_size: steps of expert load a plan averages.
    step_interval: steps between re-plans (a plan is skipped while a migration is still in flight).
    num_redundant_experts: extra replicas per MoE layer over all ranks (slots to balance with).
    balancer: placement planner from meshserve.placement: greedy (EPLB), topology, ni.
    mode: invasive (all ranks stop, copy, resume) or non-invasive (copies in chunks in the gaps between
        steps while serving; all ranks switch at one step boundary once every chunk has landed).
    chunk_bytes: size of one point-to-point send of a non-invasive migration.
    migration_timeout_s: a copy not done within this is a stalled migration: reported, abandoned,
        and serving continues on the old placement.
    """

    window_size: int = 16
    step_interval: int = 16
    num_redundant_experts: int = 0
    balancer: str = "greedy"
    mode: str = "non-invasive"
    chunk_bytes: int = 1 << 16
    migration_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("window_size", "step_interval", "chunk_bytes"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        require(
            isinstance(self.num_redundant_experts, int) and self.num_redundant_experts >= 0,
            "num_redundant_experts",
            f"must be an integer >= 0, got {self.num_redundant_experts!r}",
        )
        require(
            self.balancer in BALANCER_NAMES,
            "balancer",
            f"unknown {self.balancer!r}; allowed: {', '.join(BALANCER_NAMES)}",
        )
        require(
            self.mode in MIGRATION_MODES,
            "mode",
            f"unknown {self.mode!r}; allowed: {', '.join(MIGRATION_MODES)}",
        )
        require(
            self.migration_timeout_s > 0,
            "migration_timeout_s",
            f"must be > 0 seconds, got {self.migration_timeout_s}",
        )

    @classmethod
    def from_dict(cls, value: dict[str, Any] | EPLBConfig | None) -> EPLBConfig:
        if isinstance(value, EPLBConfig):
            return value
        value = dict(value or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            require(key in names, f"eplb_config.{key}", f"unknown key; allowed: {', '.join(sorted(names))}")
        return cls(**value)


@dataclass
class ParallelConfig:
    """How many ranks and what they share.

    data_parallel_size: worker processes; each schedules its own requests (data-parallel attention).
    enable_expert_parallel: MoE layers split their experts over the ranks (all-to-all dispatch and
        combine); without it every rank holds every expert. Dense models ignore it.
    enable_eplb: re-plan the expert placement from the ranks' own expert loads and migrate live.
    eplb_config: EPLBConfig fields as a dict.
    expert_placement: initial ``holds[moe_layer, expert, rank]`` (bool array, or a .npy path);
        None spreads experts evenly and fills the redundant slots round robin.
    ep_dispatch: how a pair picks among its expert's replicas: ``even`` (each replica an equal share, no
        communication) or ``balanced`` (the step's counts all-gathered, replicas levelled; SGLang's
        ``--ep-dispatch-algorithm``; engine/distributed/balanced.py).
    step_timeout_s: the front end's wait for one step of every rank before it calls the engine dead.
    oversubscribe: spawn more ranks than this process has cores (each rank gets one thread); without
        it such a size is refused, since ranks that share cores make no progress worth having.
    """

    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    eplb_config: dict[str, Any] | EPLBConfig = field(default_factory=dict)
    expert_placement: Any = None
    ep_dispatch: str = "even"
    step_timeout_s: float = 120.0
    oversubscribe: bool = False

    def __post_init__(self) -> None:
        n = self.data_parallel_size
        require(isinstance(n, int) and n >= 1, "data_parallel_size", f"must be an integer >= 1, got {n!r}")
        for name in ("enable_expert_parallel", "enable_eplb", "oversubscribe"):
            require(
                isinstance(getattr(self, name), bool),
                name,
                f"must be True or False, got {getattr(self, name)!r}",
            )
        require(
            not self.enable_eplb or self.enable_expert_parallel,
            "enable_eplb",
            "needs enable_expert_parallel=True (it moves experts between ranks)",
        )
        require(
            self.ep_dispatch in EP_DISPATCH,
            "ep_dispatch",
            f"unknown {self.ep_dispatch!r}; allowed: {', '.join(EP_DISPATCH)}",
        )
        require(self.step_timeout_s > 0, "step_timeout_s", f"must be > 0, got {self.step_timeout_s}")
        self.eplb_config = EPLBConfig.from_dict(self.eplb_config)
        if isinstance(self.expert_placement, str):
            try:
                self.expert_placement = np.load(self.expert_placement, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise InputError("expert_placement", f"cannot read {self.expert_placement} ({err})") from None
        if self.expert_placement is not None:
            self.expert_placement = np.asarray(self.expert_placement, dtype=bool)

    @property
    def distributed(self) -> bool:
        return self.data_parallel_size > 1 or self.enable_expert_parallel
