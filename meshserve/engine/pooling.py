"""Pooling requests: one embedding per prompt from the model's final hidden states (after the final norm).

A pooling request is a prompt run as prefill only: it is scheduled in chunks beside other requests'
prefills and decodes (one forward for all), never samples, and finishes when its last chunk has run,
which frees its KV blocks. Each chunk's rows are folded into the request's running state:

    LAST  the last prompt token's hidden state (vLLM's default for decoder models)
    MEAN  the mean over every prompt token (sentence-transformers' mean pooling)
    CLS   the first token's

and ``normalize`` (the default, as vLLM's embed task) divides by the L2 norm. A pooling request takes
no cached prefix blocks: MEAN and CLS need every row's hidden state (never kept), and even LAST would
read a prefix computed in another batch, so the same input would not always give the same bits. A
preempted request starts its fold again when its prompt is recomputed from position 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshserve.errors import require

if TYPE_CHECKING:
    from meshserve.engine.scheduler import WorkItem

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolingParams:
    """How a pooling request turns its prompt's hidden states into one vector (vLLM's names)."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        require(
            isinstance(self.pooling_type, str) and self.pooling_type.upper() in POOLING_TYPES,
            "pooling_type",
            f"must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}",
        )
        object.__setattr__(self, "pooling_type", self.pooling_type.upper())
        require(isinstance(self.normalize, bool), "normalize", f"must be a bool, got {self.normalize!r}")


def fold_chunks(hidden: torch.Tensor, items: Sequence[WorkItem], row_starts: Sequence[int]) -> None:
    """Fold each pooling item's rows of ``hidden`` [T, H] (its chunk starts at ``row_starts[i]``) into its
    request's ``pooled`` state; sets ``embedding`` on the requests whose prompt is now complete."""
    if not items:
        return
    starts = torch.tensor(list(row_starts))
    lengths = torch.tensor([it.num_tokens for it in items])
    segment = torch.repeat_interleave(torch.arange(len(items)), lengths)
    rows = starts[segment] + torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[segment]
    # One segment sum for every chunk in the step (MEAN); LAST and CLS read single rows.
    sums = torch.zeros(len(items), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, segment.to(hidden.device), hidden[rows].float())
    firsts, lasts = hidden[starts].float(), hidden[starts + lengths - 1].float()
    for i, item in enumerate(items):
        request, kind = item.request, item.request.pooling.pooling_type
        if item.start == 0:  # first chunk (again, after a preemption): start the fold over
            request.pooled = firsts[i] if kind == "CLS" else torch.zeros_like(sums[i])
        if kind == "MEAN":
            request.pooled = request.pooled + sums[i]
        elif kind == "LAST":
            request.pooled = lasts[i]
        if item.start + item.num_tokens == request.num_prompt_tokens:
            vector = request.pooled / request.num_prompt_tokens if kind == "MEAN" else request.pooled
            if request.pooling.normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            request.embedding = vector.cpu()
