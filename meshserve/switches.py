"""Every environment variable meshserve reads, what it does, and the values this process runs with.

An engine's configuration reads the switches once (``EngineConfig.switches``: the environment, then the
``switches={...}`` engine argument over it) and the engine installs them (``use``) before it loads the
model; kernels ask ``value(name)``, never os.environ, so a run's kernel paths cannot change under it and
``meshserve env`` prints what a bug report needs. No torch here: wafer/ may read this list too.

    MESHSERVE_ATTENTION=reference meshserve env      # the switches and the kernel paths they choose
    LLM(model, device="cuda", switches={"MESHSERVE_ATTENTION": "triton"})  # the opt-in, as an engine arg
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import require


@dataclass(frozen=True)
class Switch:
    """One environment variable: its default ("" = unset), the values it takes (() = any text) and why."""

    name: str
    default: str
    choices: tuple[str, ...]
    help: str
    secret: bool = False  # `meshserve env` prints "(set)", never the value


SWITCHES = (
    Switch(
        "MESHSERVE_ATTENTION",
        "auto",
        ("auto", "reference", "triton"),
        "Attention kernel. auto: the native CPU op where this machine built it, else the torch reference; "
        "on CUDA the reference too (the Triton kernel has not run on a GPU yet). reference: torch always. "
        "triton: the Triton kernel (opt-in on CUDA; CPU tensors only under TRITON_INTERPRET=1).",
    ),
    Switch(
        "MESHSERVE_FUSED",
        "native",
        ("native", "reference"),
        "Fused elementwise ops (RMSNorm, rotary, SiLU-mul): the native CPU kernels or the torch reference.",
    ),
    Switch(
        "MESHSERVE_MOE",
        "native",
        ("native", "reference"),
        "Routed experts: the native fused MoE op (CPU) or the torch reference, chosen when a layer loads.",
    ),
    Switch(
        "MESHSERVE_CUDA_EP",
        "off",
        ("off", "nccl"),
        "Several ranks on CUDA (data-parallel attention, expert-parallel MoE over NCCL): refused unless "
        "nccl, since that path has not run on a GPU yet.",
    ),
    Switch(
        "MESHSERVE_PROFILE_DIR",
        "",
        (),
        "Folder of this machine's kernel profiles (gemm-<isa>-<threads>t.json, attention.json, mla.json); "
        "unset: $XDG_CACHE_HOME/meshserve/profiles, else ~/.cache/meshserve/profiles.",
    ),
    Switch(
        "MESHSERVE_PROFILE",
        "on",
        ("on", "off"),
        "on: an engine on a CPU profiles the GEMM shapes its kernel tables lack on first start (seconds, a "
        "progress bar, cached in MESHSERVE_PROFILE_DIR); off: the stand-in table serves them.",
    ),
    Switch(
        "MESHSERVE_AMX",
        "on",
        ("on", "off"),
        "off: an AMX machine chooses and profiles kernels as the avx512_bf16 machine it also is (to measure "
        "both paths on one machine).",
    ),
    Switch(
        "MESHSERVE_BUILD_DIR",
        "",
        (),
        "Folder of the native build (read when the ops first load); unset: build/native in the checkout.",
    ),
    Switch(
        "MESHSERVE_WAFER_MEMORY_GIB",
        "",
        (),
        "Memory budget of a wafer run in GiB (wafer/limits.py, read per run); unset: presets/limits.yaml.",
    ),
    Switch(
        "MESHSERVE_API_KEY",
        "",
        (),
        "meshserve serve: the key clients must send as 'Authorization: Bearer <key>' when --api-key is not "
        "given (`meshserve env` shows only whether it is set).",
        secret=True,
    ),
    Switch(
        "MESHSERVE_EP_FAULT",
        "",
        (),
        "Fault drill for tests: start:R fails rank R while it starts, stall:R stops its migration chunks, "
        "close:0 makes torchrun's rank 0 take 12 s before it closes the other ranks.",
    ),
    Switch(
        "MESHSERVE_PD_FAULT",
        "",
        (),
        "Fault drill for tests of prefill/decode transfers (engine/pd/): die:recv makes the decode process "
        "exit in its first KV receive, stall:send makes the prefill process wait past the timeout before "
        "its first KV send.",
    ),
)
BY_NAME = {s.name: s for s in SWITCHES}

# Read, not owned: set by other tools. Listed so `meshserve env` shows them with the rest.
FOREIGN = {
    "TRITON_INTERPRET": "Triton's interpreter (1: Triton kernels run on CPU tensors, as tests check them).",
    "OMP_NUM_THREADS": "BLAS threads of each wafer sweep worker (wafer/fanout.py).",
    "HF_HUB_CACHE": "Hugging Face hub cache where model ids are looked up (models/hub.py); "
    "HUGGINGFACE_HUB_CACHE is its older name.",
    "HUGGINGFACE_HUB_CACHE": "older name of HF_HUB_CACHE.",
    "HF_HOME": "Hugging Face home: model ids are looked up in HF_HOME/hub unless HF_HUB_CACHE is set.",
    "XDG_CACHE_HOME": "the user's cache: the hub cache defaults to XDG_CACHE_HOME/huggingface/hub.",
    "HF_HUB_OFFLINE": "Hugging Face offline mode (meshserve never downloads anyway).",
    "RANK": "torchrun: this process's rank (with WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, "
    "MASTER_PORT it marks a torchrun launch; engine/distributed/torchrun.py).",
}

_installed: Mapping[str, str] | None = None


def read(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every switch's value: ``overrides`` (engine argument), else the environment, else its default;
    an unknown name or value is an InputError naming the switch and what it takes."""
    overrides = dict(overrides or {})
    for name in overrides:
        require(name in BY_NAME, "switches", f"unknown switch {name!r}; allowed: {', '.join(BY_NAME)}")
    values = {}
    for s in SWITCHES:
        value = str(overrides.get(s.name, os.environ.get(s.name, "")) or s.default)
        require(
            not s.choices or value in s.choices,
            s.name,
            f"unknown value {value!r}; allowed: {', '.join(s.choices)}",
        )
        values[s.name] = value
    return values


def use(values: Mapping[str, str] | None) -> None:
    """Install an engine's switches for this process (the engine does, before it loads the model); None:
    read the environment again on next use."""
    global _installed
    _installed = values


def refresh() -> Mapping[str, str]:
    """Re-read the environment and install it (tests and benchmarks that change a switch mid-process)."""
    use(read())
    return _installed


def value(name: str) -> str:
    """The installed value of switch ``name`` (the environment's, read on first use, when no engine has
    installed any)."""
    if _installed is None:
        refresh()
    return _installed[name]


def profile_dir() -> Path:
    """Where this machine's kernel profiles live (MESHSERVE_PROFILE_DIR, else the user's cache)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(value("MESHSERVE_PROFILE_DIR") or Path(cache_home) / "meshserve" / "profiles")
