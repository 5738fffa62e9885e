"""The input embedding of a model with a tied lm_head: its rows read from the lm_head's one layout."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.smooth_gemm import SmoothLinear


class TiedEmbedding(nn.Module):
    """Takes nn.Embedding's place once the tied lm_head has packed the shared weight (and dropped the loaded
    one): a lookup reads the packed rows, so the [vocab, hidden] matrix is held once, in the GEMM's layout."""

    def __init__(self, head: SmoothLinear) -> None:
        super().__init__()
        self._head = (head,)  # not a submodule: the model holds it as lm_head already

    @property
    def weight(self) -> torch.Tensor:
        """The shared weight as its shape and dtype (on meta: the data lives packed in the lm_head)."""
        return self._head[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].rows(ids)
