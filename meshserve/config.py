"""Engine settings: cache, scheduler and engine dataclasses with vLLM's names, validated on creation.

``EngineConfig.from_args(model, **engine_args)`` is what ``LLM(model, **engine_args)`` calls: it
splits the flat vLLM-style keyword arguments into the cache and scheduler settings and rejects
unknown names, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshserve.errors import InputError, require

if TYPE_CHECKING:
    from meshserve.engine.spec.config import SpecConfig

DTYPE_NAMES = ("float32", "bfloat16")
DEFAULT_MAX_NUM_SEQS = 128


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class CacheConfig:
    """Paged KV cache.

    block_size: tokens per KV block.
    kv_cache_memory: GiB for the KV cache of all layers; None derives it from free memory
        (``kv_cache_fraction`` of what the machine has available, capped at what
        ``max_num_seqs`` full-length sequences could use).
    num_kv_blocks: exact block count, overriding kv_cache_memory (tests use it to force preemption).
    enable_prefix_caching: automatic prefix caching: full blocks of verified tokens are reused across
        requests (engine/prefix_cache.py); on by default.
    """

    block_size: int = 16
    kv_cache_memory: float | None = None
    kv_cache_fraction: float = 0.25
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
                f"must be a power of two in [1, 128], got {self.block_size}")
        require(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
                f"must be a positive number of GiB, got {self.kv_cache_memory}")
        require(0 < self.kv_cache_fraction <= 0.9, "kv_cache_fraction",
                f"must be in (0, 0.9], got {self.kv_cache_fraction}")
        require(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks",
                f"must be >= 1, got {self.num_kv_blocks}")
        require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                f"must be True or False, got {self.enable_prefix_caching!r}")


@dataclass
class SchedulerConfig:
    """Token-budget scheduling.

    max_num_batched_tokens: tokens per step (prefill chunks + decodes + verify tokens together).
    max_num_seqs: requests running at once (default: 128, or the token budget if smaller).
    max_model_len: longest prompt + output; None takes the model's max_position_embeddings.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs is None:
            self.max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, self.max_num_batched_tokens)
        require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        # Every running request must be able to decode in every step, or some would starve.
        require(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
                f"must be >= max_num_seqs ({self.max_num_seqs}), got {self.max_num_batched_tokens}")
        require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
                f"must be >= 1, got {self.max_model_len}")


@dataclass
class EngineConfig:
    """Everything an Engine needs: the model directory, numerics and the two setting groups.

    record_expert_trace: path of an expert-load trace (.npz, docs/traces.md) written on close (MoE only).
    speculative_config: vLLM-style dict, e.g. ``{"method": "ngram", "num_speculative_tokens": 3}``
        (engine/spec/config.py); validated into a SpecConfig. None = no speculative decoding.
    num_threads: torch threads for the forward (sets ``torch.set_num_threads`` for the process);
        None = the cores this process may run on (``os.sched_getaffinity``).
    kernel_profile: a GEMM profile written by ``meshserve profile``; None = this machine's profile when
        one was written, else the shipped default (kernels/profile.py).
    """

    model: str
    dtype: str = "float32"
    seed: int = 0
    record_expert_trace: str | None = None
    speculative_config: dict[str, Any] | SpecConfig | None = None
    num_threads: int | None = None
    kernel_profile: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and bool(self.model), "model", "must be a model directory")
        require(self.dtype in DTYPE_NAMES, "dtype",
                f"unsupported dtype {self.dtype!r}; allowed: {', '.join(DTYPE_NAMES)}")
        require(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        cores = available_cores()
        if self.num_threads is None:
            self.num_threads = cores
        require(isinstance(self.num_threads, int) and not isinstance(self.num_threads, bool)
                and 1 <= self.num_threads <= cores, "num_threads",
                f"must be an integer in [1, {cores}] (the cores this process may use), "
                f"got {self.num_threads!r}")
        from meshserve.engine.spec.config import SpecConfig  # here: the engine package imports this module

        self.speculative_config = SpecConfig.from_dict(self.speculative_config)

    @classmethod
    def from_args(cls, model: str, **engine_args: Any) -> EngineConfig:
        """Build from flat vLLM-style keyword arguments (``block_size=8, max_num_seqs=16, ...``)."""
        groups: dict[type, dict[str, Any]] = {CacheConfig: {}, SchedulerConfig: {}, cls: {}}
        owner = {f.name: group for group in groups for f in dataclasses.fields(group)}
        for name, value in engine_args.items():
            if name not in owner or name in ("cache", "scheduler", "model"):
                allowed = sorted(n for n in owner if n not in ("cache", "scheduler", "model"))
                raise InputError(name, f"unknown engine argument; allowed: {', '.join(allowed)}")
            groups[owner[name]][name] = value
        return cls(
            model=str(model),
            cache=CacheConfig(**groups[CacheConfig]),
            scheduler=SchedulerConfig(**groups[SchedulerConfig]),
            **groups[cls],
        )
