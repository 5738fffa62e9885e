"""The flat token batch a model forward sees: many sequences' tokens in one row, plus paged-KV metadata.

The engine's runner builds it; models and kernels read it. Models never see requests. It lives with the
kernels (their input interface) so kernels/ stays a leaf; meshserve.models.batch re-exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PAD_BLOCK = -1  # block-table padding: no block has this id


@dataclass
class BatchMetadata:
    """Metadata for one forward over T flat tokens from S sequences.

    Sequence s owns query rows ``query_start_loc[s]:query_start_loc[s+1]`` of the flat batch;
    those rows are its last ``q_len`` tokens, so row i of sequence s sits at position
    ``seq_lens[s] - q_len + i`` and attends causally to KV positions ``0..position``.

    positions: int64 [T]; rotary position of every token.
    slot_mapping: int64 [T]; flat KV slot each token's K/V is written to
        (``block_id * block_size + offset``).
    query_start_loc: int32 [S + 1]; cumulative query-token counts (starts at 0).
    seq_lens: int32 [S]; KV length of each sequence after this step's tokens are written.
    block_tables: int32 [S, max_blocks]; KV blocks of each sequence in order, padded with ``PAD_BLOCK``
        (not a block: the native attention op fails loudly on a task that reads past its sequence's blocks).
    logits_indices: int64 [N]; flat rows whose logits are needed (the rows that sample or verify).
    rope_lens: int64 [S] or None; each sequence's whole length as far as known (a prompt's full length even
        while it is prefilled in chunks): LongRoPE picks its factors by it. None: derived from the rows.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    logits_indices: torch.Tensor
    rope_lens: torch.Tensor | None = None

    def to(self, device: torch.device) -> BatchMetadata:
        """The same metadata on ``device`` (the engine's, when it is not the CPU)."""
        return BatchMetadata(
            *(
                None if (t := getattr(self, f.name)) is None else t.to(device)
                for f in dataclasses.fields(self)
            )
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
