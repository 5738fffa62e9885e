"""Model runner: flattens a step's work items into one token batch and runs one forward.

Prefill chunks, decodes and verifies of different requests become rows of the same flat batch;
the model sees only ``input_ids`` and ``BatchMetadata`` (meshserve/models/batch.py), never requests.
Token-level arrays are built with numpy (``repeat`` / ``arange`` / fancy indexing); the only Python
work per request is collecting its token slice and handing its block table to one flat copy.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch

from meshserve.engine.scheduler import WorkItem
from meshserve.models.batch import PAD_BLOCK, BatchMetadata


def build_batch(items: list[WorkItem], block_size: int) -> tuple[torch.Tensor, BatchMetadata]:
    """The flat ``input_ids`` and metadata for ``items`` (in order; each item's rows are contiguous)."""
    n = np.fromiter((it.num_tokens for it in items), dtype=np.int64, count=len(items))
    start = np.fromiter((it.start for it in items), dtype=np.int64, count=len(items))
    num_logits = np.fromiter((it.num_logits for it in items), dtype=np.int64, count=len(items))
    meta = batch_metadata(start, n, num_logits, [it.request.block_table for it in items], block_size)
    known = np.fromiter((it.request.num_tokens for it in items), dtype=np.int64, count=len(items))
    meta.rope_lens = torch.from_numpy(np.maximum(known, start + n))  # a verify's drafts count too
    chunks = [it.request.query_tokens(it.start, it.num_tokens) for it in items]
    input_ids = np.fromiter(chain.from_iterable(chunks), dtype=np.int64, count=int(n.sum()))
    return torch.from_numpy(input_ids), meta


def pad_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one int64 array [S, longest] padded with PAD_BLOCK: one flat copy and one scatter."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    out = np.full((len(tables), int(lens.max(initial=0))), PAD_BLOCK, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    out[np.repeat(np.arange(len(tables)), lens), np.arange(flat.size) - np.repeat(starts, lens)] = flat
    return out


def batch_metadata(
    start: np.ndarray, n: np.ndarray, num_logits: np.ndarray, tables: list[list[int]], block_size: int
) -> BatchMetadata:
    """Metadata for sequences that each append ``n[s]`` tokens after ``start[s]`` cached ones, with
    logits at their last ``num_logits[s]`` rows (the draft model's runner uses it too)."""
    total = int(n.sum())
    query_start = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=query_start[1:])
    seq_of_row = np.repeat(np.arange(len(n)), n)
    positions = np.arange(total) - np.repeat(query_start[:-1] - start, n)

    block_tables = pad_tables(tables)
    slot_mapping = block_tables[seq_of_row, positions // block_size] * block_size + positions % block_size

    # The last num_logits rows of each item: its row end minus num_logits .. its row end.
    ends = np.repeat(query_start[1:] - num_logits, num_logits)
    logits_indices = (
        ends + np.arange(int(num_logits.sum())) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
    )
    return BatchMetadata(
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        query_start_loc=torch.from_numpy(query_start.astype(np.int32)),
        seq_lens=torch.from_numpy((start + n).astype(np.int32)),
        block_tables=torch.from_numpy(block_tables.astype(np.int32)),
        logits_indices=torch.from_numpy(logits_indices),
    )


class ModelRunner:
    """Runs the model on a list of work items against the engine's paged KV cache."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.hidden: torch.Tensor | None = (
            None  # the last forward's final-normed rows (the MTP draft's input)
        )

    @torch.inference_mode()
    def execute(self, items: list[WorkItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for all items: float32 logits [sum(num_logits), vocab] on the CPU, in item order, and
        the final hidden states [T, hidden] of every row (pooling requests read theirs)."""
        input_ids, meta = build_batch(items, self.block_size)
        device = self.kv_caches[0].device
        if device.type != "cpu":  # the step's tensors go where the weights and the cache are
            input_ids, meta = input_ids.to(device), meta.to(device)
        self.hidden = hidden = self.model(input_ids, meta, self.kv_caches)
        if meta.logits_indices.numel() == 0:  # a step of pooling chunks only
            return torch.empty(0, self.model.config.vocab_size), hidden
        return self.model.compute_logits(hidden[meta.logits_indices]).cpu(), hidden  # sampler: on the CPU
