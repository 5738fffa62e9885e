"""Where the engine computes: ``device="cpu"`` (native kernels where they apply) or ``"cuda"`` (the torch
reference kernels), and the torch.distributed backend that goes with it.

    resolve_device("cuda", local_rank=1)  # cuda:1 on a host with 2+ GPUs; InputError without CUDA
    process_group_backend(torch.device("cuda", 0))  # "cpu:gloo,cuda:nccl"
    free_memory(torch.device("cuda", 0))  # what that GPU has left, after the weights already on it
"""

from __future__ import annotations

import torch

from meshserve.config import DEVICES
from meshserve.errors import require
from meshserve.machine import available_memory


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch device for ``name``: with ``local_rank``, ranks on one host take its GPUs in turn;
    without, the current CUDA device (a rank sets it before building its engine)."""
    require(name in DEVICES, "device", f"unknown {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    require(
        torch.cuda.is_available(),
        "device",
        f"cuda is not available here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
        "use --device cpu",
    )
    index = torch.cuda.current_device() if local_rank is None else local_rank % torch.cuda.device_count()
    return torch.device("cuda", index)


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU. On CUDA, NCCL carries the CUDA tensors (all-to-all dispatch and combine, migration
    copies) and gloo the CPU ones (load windows, plans, flags, commands): torch picks by tensor device."""
    return "gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl"


def free_memory(device: torch.device) -> int:
    """Bytes the KV cache may draw on: the host's available memory on CPU, the GPU's free memory (what
    its driver reports, after whatever is already on it) on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()
