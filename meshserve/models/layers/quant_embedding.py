"""QuantEmbedding: the input embedding of a model whose tied lm_head is quantized, read from the head's
packed rows, so the [vocab, hidden] matrix is resident once (DESIGN.md: one resident copy of every weight).

A lookup unpacks only the looked-up rows (kernels/quant_gemm.py's ``dequantize_rows``: per-row scale for
int8, group scales and zeros for int4) and rounds them to the model dtype, as an embedding holding the
dequantized weight would return them.
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_gemm import dequantize_rows
from meshserve.models.layers.quant_linear import QuantLinear


class QuantEmbedding(nn.Module):
    """nn.Embedding's forward over a QuantLinear's weight [vocab, hidden]."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        # A tuple, not a submodule: the head's buffers stay named (loaded, moved, counted) once, as lm_head's.
        self._head = (head,)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight's shape and dtype (no data: a meta tensor, as QuantLinear's)."""
        return self._head[0].weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        rows = dequantize_rows(head.packed(), input_ids.reshape(-1))
        return rows.to(head.dtype).reshape(*input_ids.shape, self.embedding_dim)
