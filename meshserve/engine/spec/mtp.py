"""MTP proposer: DeepSeek-V3's multi-token-prediction layer drafts from the target's own hidden states.

At position i the MTP layer reads the target's hidden row h_i and token i + 1 and guesses token i + 2
(models/mtp.py). After each target forward the engine hands over the hidden rows of the tokens that are
now verified (`observe`: a verify's accepted rows, a prefill chunk's rows); before the next step `propose`
feeds the layer every row it has not seen yet, all requests in one forward (its KV catches up), and the
last row's logits give the first draft, the token after the request's newest. Each further draft feeds the
layer's own output row with the draft before it; the KV rows those write are overwritten by the next
catch-up, which is the whole rollback.

The layer's KV is a latent cache of its own, one fixed run of blocks per request slot (slots for
max_num_seqs requests, counted in the engine's KV budget like a draft model's), read by the same attention
op as the target's. Slot row j holds position base + j, base being the first position the proposer saw a
hidden row for: a prefix-cache hit skips the target's forward over the cached tokens, so there the MTP
context starts after them (drafts may be worse; outputs are the target's either way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meshserve.engine.kv_cache import allocate_kv_cache, block_bytes
from meshserve.engine.runner import batch_metadata
from meshserve.engine.scheduler import WorkItem
from meshserve.engine.spec.draft import PickFn
from meshserve.models.config import ModelConfig
from meshserve.models.decoder import DecoderLM


@dataclass
class _Seq:
    slot: int
    base: int  # the position of the slot's first row
    fed: int  # positions base .. fed - 1 hold the MTP KV of verified rows
    pending: list[torch.Tensor] = field(default_factory=list)  # target rows of positions fed, fed + 1, ...

    @property
    def seen(self) -> int:
        """Positions whose target hidden row the proposer has had (fed or pending)."""
        return self.fed + sum(p.shape[0] for p in self.pending)


class MTPProposer:
    """Proposes up to k tokens per request with the target's MTP layer (`model.mtp`)."""

    def __init__(self, model: DecoderLM, k: int, max_len: int, block_size: int, max_slots: int) -> None:
        cfg = model.config
        self.model, self.k, self.block_size = model, k, block_size
        per_slot = math.ceil(max_len / block_size)
        device = model.norm.weight.device  # a tied embedding's weight may live packed (TiedEmbedding)
        self.cache = allocate_kv_cache(
            1, max_slots * per_slot, block_size, 1, cfg.head_dim, cfg.dtype, device, cfg.kv_cache_parts
        )[0]
        self.tables = np.arange(max_slots * per_slot).reshape(max_slots, per_slot)
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.seqs: dict[str, _Seq] = {}

    @staticmethod
    def cache_bytes(cfg: ModelConfig, max_len: int, block_size: int, max_slots: int) -> int:
        """Bytes of the MTP layer's KV cache for ``max_slots`` requests of up to ``max_len`` tokens."""
        per_block = block_bytes(1, cfg.num_kv_heads, cfg.head_dim, block_size, cfg.dtype, cfg.kv_cache_parts)
        return per_block * max_slots * math.ceil(max_len / block_size)

    def remove(self, req_id: str) -> None:
        """Forget a finished, aborted or preempted request and free its slot."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.free_slots.append(seq.slot)

    def observe(self, items: Sequence[WorkItem], hidden: torch.Tensor) -> None:
        """Keep the target's hidden rows [T, hidden] of the step that ran ``items`` (flat, in item order)
        whose next token is known now: each item's rows up to its request's newest token (a verify's
        rejected drafts and the row that sampled are not)."""
        row = 0
        for item in items:
            request = item.request
            keep = min(item.num_tokens, request.num_tokens - 1 - item.start)
            if keep > 0 and not request.is_finished:
                self._append(request.request_id, item.start, hidden[row : row + keep])
            row += item.num_tokens

    def _append(self, req_id: str, start: int, rows: torch.Tensor) -> None:
        seq = self.seqs.get(req_id)
        if seq is None or not seq.base <= start <= seq.seen:  # new, or a gap: the context starts here
            if seq is None and not self.free_slots:
                return
            slot = self.free_slots.pop() if seq is None else seq.slot
            seq = self.seqs[req_id] = _Seq(slot, start, start)
        elif start < seq.fed:  # recomputed rows: the KV from there on is rewritten
            seq.fed, seq.pending = start, []
        elif start < seq.seen:
            seq.pending = [torch.cat(seq.pending)[: start - seq.fed]]
        seq.pending.append(rows.clone())  # not a view: the step's hidden tensor is let go

    @torch.inference_mode()
    def propose(
        self, req_ids: Sequence[str], contexts: Sequence[Sequence[int]], limits: Sequence[int], pick: PickFn
    ) -> list[list[int]]:
        """Drafts, at most ``min(k, limits[i])`` each, picked by ``pick`` from the MTP layer's logits; none
        for a request whose hidden rows do not reach its newest token."""
        drafts: list[list[int]] = [[] for _ in req_ids]
        want = [max(min(self.k, lim), 0) for lim in limits]
        ready = [
            i
            for i, r in enumerate(req_ids)
            if want[i] and r in self.seqs and self.seqs[r].fed < self.seqs[r].seen == len(contexts[i]) - 1
        ]
        if not ready:
            return drafts
        seqs = [self.seqs[req_ids[i]] for i in ready]
        counts = [s.seen - s.fed for s in seqs]
        ids = [t for i, s in zip(ready, seqs, strict=True) for t in contexts[i][s.fed + 1 : s.seen + 1]]
        hidden = torch.cat([p for s in seqs for p in s.pending])
        x, logits = self._forward(ids, hidden, seqs, [s.fed for s in seqs], counts)
        for s in seqs:
            s.fed, s.pending = s.seen, []
        active = list(range(len(ready)))  # indices into ready / seqs
        for step in range(max(want[i] for i in ready)):
            picked = pick(logits, [ready[j] for j in active], step).tolist()
            for j, token in zip(active, picked, strict=True):
                drafts[ready[j]].append(token)
            more = [n for n, j in enumerate(active) if len(drafts[ready[j]]) < want[ready[j]]]
            if not more:
                break
            active, x = [active[n] for n in more], x[more]
            tokens = [drafts[ready[j]][-1] for j in active]
            positions = [
                seqs[j].fed + step for j in active
            ]  # the draft's row: rewritten by the next catch-up
            x, logits = self._forward(tokens, x, [seqs[j] for j in active], positions, [1] * len(active))
        return drafts

    def _forward(
        self,
        ids: list[int],
        hidden: torch.Tensor,
        seqs: list[_Seq],
        first: list[int],
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over ``counts[s]`` rows of each of ``seqs`` from position ``first[s]``: its output
        rows and float32 logits [S, vocab] (CPU) at each sequence's last row."""
        n = np.asarray(counts, dtype=np.int64)
        bases = np.asarray([s.base for s in seqs], dtype=np.int64)
        start = np.asarray(first, dtype=np.int64) - bases
        tables = [self.tables[s.slot].tolist() for s in seqs]
        meta = batch_metadata(start, n, np.ones_like(n), tables, self.block_size)
        meta.positions += torch.from_numpy(np.repeat(bases, n))  # rotary at the true positions
        device = self.cache.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        if device.type != "cpu":
            meta = meta.to(device)
        embeds = self.model.embed_tokens(ids_t)
        step = self.model.step_inputs(meta, embeds.dtype, self.cache)
        x, normed = self.model.mtp.predict(embeds, hidden, self.cache, step)
        last = meta.logits_indices
        return x[last], self.model.compute_logits(normed[last]).cpu()
