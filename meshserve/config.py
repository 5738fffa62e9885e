"""Engine settings: cache, scheduler and engine dataclasses with vLLM's names, validated on creation.

``EngineConfig.from_args(model, **engine_args)`` is what ``LLM(model, **engine_args)`` calls: it
splits the flat vLLM-style keyword arguments into the cache and scheduler settings and rejects
unknown names, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshserve.atomic import check_writable
from meshserve.errors import InputError, boolean, integer, number, require
from meshserve.switches import read as read_switches

if TYPE_CHECKING:
    from meshserve.engine.distributed.config import ParallelConfig
    from meshserve.engine.spec.config import SpecConfig

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's (config.json)
DEVICES = ("cpu", "cuda")  # engine/device.py turns these into torch devices
ROLES = ("mixed", "prefill", "decode")  # prefill/decode disaggregation (engine/pd/, docs/disaggregation.md)
DEFAULT_MAX_NUM_SEQS = 128
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_TOKENS = 1 << 24  # token budgets and lengths beyond 16M are typos, not settings
MAX_TPOT_MS = 60_000.0  # a time-between-tokens target of over a minute is a unit mistake


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
        self.block_size = integer(self.block_size, "block_size", 1, 128)
        require(
            self.block_size in BLOCK_SIZES,
            "block_size",
            f"must be a power of two in [1, 128], got {self.block_size}",
        )
        if self.kv_cache_memory is not None:  # checked against the machine once the model's size is known
            self.kv_cache_memory = number(self.kv_cache_memory, "kv_cache_memory", 0, low_open=True)
        self.kv_cache_fraction = number(self.kv_cache_fraction, "kv_cache_fraction", 0, 0.9, low_open=True)
        if self.num_kv_blocks is not None:
            self.num_kv_blocks = integer(self.num_kv_blocks, "num_kv_blocks", 1)
        boolean(self.enable_prefix_caching, "enable_prefix_caching")


@dataclass
class SchedulerConfig:
    """Token-budget scheduling.

    max_num_batched_tokens: tokens per step (prefill chunks + decodes + verify tokens together).
    max_num_seqs: requests running at once (default: 128, or the token budget if smaller).
    max_model_len: longest prompt + output; None takes the model's max_position_embeddings.
    tpot_target_ms: keep each step's time (the time between a request's tokens) under this many ms: the
        step's token budget adapts, up to max_num_batched_tokens (engine/token_budget.py). None = off.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    tpot_target_ms: float | None = None

    def __post_init__(self) -> None:
        self.max_num_batched_tokens = integer(
            self.max_num_batched_tokens, "max_num_batched_tokens", 1, MAX_TOKENS
        )
        if self.max_num_seqs is None:
            self.max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, self.max_num_batched_tokens)
        self.max_num_seqs = integer(self.max_num_seqs, "max_num_seqs", 1, MAX_TOKENS)
        # Every running request must be able to decode in every step, or some would starve.
        require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            f"must be >= max_num_seqs ({self.max_num_seqs}), got {self.max_num_batched_tokens}",
        )
        if self.max_model_len is not None:  # the model's max_position_embeddings caps it (Engine)
            self.max_model_len = integer(self.max_model_len, "max_model_len", 2, MAX_TOKENS)
        if self.tpot_target_ms is not None:
            self.tpot_target_ms = number(self.tpot_target_ms, "tpot_target_ms", 0, MAX_TPOT_MS, low_open=True)


@dataclass
class EngineConfig:
    """Everything an Engine needs: the model directory, numerics and the two setting groups.

    model: a model directory, or a Hugging Face id (Org/Name) found in the local cache (models/hub.py).
    dtype: "auto" (the checkpoint's torch_dtype), "float32", "bfloat16" or "float16".
    revision: the cached snapshot of a model id: a branch, tag or commit (None = "main").
    quantization: weight-only quantization, vLLM's names (docs/quantization.md): None = the checkpoint's
        own (its config.json quantization_config, else none); "gptq", "awq", "compressed-tensors" (a
        checkpoint in that format);
        "int8" (per-output-channel symmetric) or "int4" (group 128, asymmetric), made while a float
        checkpoint loads.
    quantize_lm_head: None = the quantization's default (int8 / int4 at load quantize the lm_head, a tied
        input embedding reading the same packed rows; GPTQ keeps it as the checkpoint stores it; AWQ and
        compressed-tensors keep it float); True quantizes a float lm_head at load; False keeps it in the
        model dtype.

    record_expert_trace: path of an expert-load trace (.npz, docs/traces.md) written on close (MoE only).
    speculative_config: vLLM-style dict, e.g. ``{"method": "ngram", "num_speculative_tokens": 3}``
        (engine/spec/config.py); validated into a SpecConfig. None = no speculative decoding.
    parallel: data-parallel ranks, expert parallelism and EPLB (engine/distributed/config.py); flat
        arguments ``data_parallel_size=4, enable_expert_parallel=True, ...`` land here.
    num_threads: torch threads for the forward (``torch.set_num_threads``, which holds per calling thread:
        every step sets it again, so two engines in one process keep their own); None = the cores this
        process may run on (``os.sched_getaffinity``).
    kernel_profile: a GEMM profile written by ``meshserve profile``; None = the tables for this machine's
        ISA and threads, its missing shapes profiled on first use (engine/kernel_profile.py, docs/gemm.md).
    kernel_memory_budget: bytes the GEMM kernels may keep in extra weight layouts (0: each linear keeps
        one layout of its weights; kernels/gemm_layout.py, docs/engine.md "Memory").
    device: "cpu" (native kernels where they apply) or "cuda" (weights, KV cache and step tensors on the
        GPU, torch reference kernels; engine/device.py). Checked against the machine when the engine starts.
    switches: the environment switches this engine runs with (meshserve/switches.py), read here once, with
        this argument's entries over the environment, e.g. ``{"MESHSERVE_ATTENTION": "triton"}``.
    role: "mixed" (prefill and decode here), "prefill" (run prompts and sample the first token, then hand
        the request and its KV blocks over: ``Engine.handoffs``) or "decode" (also continue requests handed
        over by a prefill engine, engine/pd/). Engine configuration, not another engine: it can change live.
    pd: "prefill=N,decode=M" runs N prefill and M decode processes behind this engine's interface (PDEngine).
    """

    model: str
    dtype: str = "auto"
    seed: int = 0
    revision: str | None = None
    quantization: str | None = None
    quantize_lm_head: bool | None = None
    record_expert_trace: str | None = None
    speculative_config: dict[str, Any] | SpecConfig | None = None
    num_threads: int | None = None
    kernel_profile: str | None = None
    kernel_memory_budget: int = 0
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig | None = None
    switches: Mapping[str, str] | None = None
    role: str = "mixed"
    pd: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and bool(self.model), "model", "must be a model directory")
        require(
            isinstance(self.dtype, str) and self.dtype in DTYPE_NAMES,
            "dtype",
            f"unsupported dtype {self.dtype!r}; allowed: {', '.join(DTYPE_NAMES)}",
        )
        require(
            self.revision is None or (isinstance(self.revision, str) and bool(self.revision)),
            "revision",
            f"must be a branch, tag or commit name, got {self.revision!r}",
        )
        from meshserve.models.quant.config import METHODS  # here: the models package imports this one

        require(
            self.quantization is None or self.quantization in METHODS,
            "quantization",
            f"unsupported {self.quantization!r}; allowed: {', '.join(METHODS)} (None: the checkpoint's own)",
        )
        if self.quantize_lm_head is not None:
            boolean(self.quantize_lm_head, "quantize_lm_head")
        self.seed = integer(self.seed, "seed", 0, 2**64 - 1)  # seeds the seeds of unseeded requests
        self.kernel_memory_budget = integer(self.kernel_memory_budget, "kernel_memory_budget", 0, 2**63 - 1)
        require(self.role in ROLES, "role", f"unknown {self.role!r}; allowed: {', '.join(ROLES)}")
        require(self.device in DEVICES, "device", f"unknown {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.record_expert_trace is not None:  # fail now, not when the trace is written on close
            trace = self.record_expert_trace
            require(
                isinstance(trace, str | os.PathLike) and str(trace).endswith(".npz"),
                "record_expert_trace",
                f"must be a path ending in .npz (an npz archive), got {trace!r}",
            )
            check_writable(trace, "record_expert_trace")
            self.record_expert_trace = str(trace)
        cores = available_cores()
        if self.num_threads is None:
            self.num_threads = cores
        require(
            isinstance(self.num_threads, int)
            and not isinstance(self.num_threads, bool)
            and 1 <= self.num_threads <= cores,
            "num_threads",
            f"must be an integer in [1, {cores}] (the cores this process may use), got {self.num_threads!r}",
        )
        # Imported here: the engine package imports this module.
        from meshserve.engine.distributed.config import ParallelConfig
        from meshserve.engine.spec.config import SpecConfig

        self.speculative_config = SpecConfig.from_dict(self.speculative_config)
        spec = self.speculative_config
        require(
            self.device == "cpu" or spec is None or spec.method != "draft_model",
            "speculative_config",
            "method 'draft_model' runs on device cpu only (its draft runs on the CPU); use 'ngram'",
        )
        self.parallel = self.parallel or ParallelConfig()
        if self.pd is not None:
            from meshserve.engine.pd.config import parse_pd

            parse_pd(self.pd)
            require(
                not self.parallel.distributed and self.role == "mixed",
                "pd",
                "runs its prefill and decode processes itself: no data_parallel_size > 1, expert "
                "parallelism or role with it",
            )
        self.switches = read_switches(self.switches)

    @classmethod
    def from_args(cls, model: str, **engine_args: Any) -> EngineConfig:
        """Build from flat vLLM-style keyword arguments (``block_size=8, max_num_seqs=16, ...``)."""
        from meshserve.engine.distributed.config import ParallelConfig

        groups: dict[type, dict[str, Any]] = {
            CacheConfig: {},
            SchedulerConfig: {},
            ParallelConfig: {},
            cls: {},
        }
        owner = {f.name: group for group in groups for f in dataclasses.fields(group)}
        internal = ("cache", "scheduler", "parallel", "model")
        for name, value in engine_args.items():
            if name not in owner or name in internal:
                allowed = sorted(n for n in owner if n not in internal)
                raise InputError(name, f"unknown engine argument; allowed: {', '.join(allowed)}")
            groups[owner[name]][name] = value
        return cls(
            model=str(model),
            cache=CacheConfig(**groups[CacheConfig]),
            scheduler=SchedulerConfig(**groups[SchedulerConfig]),
            parallel=ParallelConfig(**groups[ParallelConfig]),
            **groups[cls],
        )
