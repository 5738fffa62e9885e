"""Draft-model proposer: a smaller model with the target's tokenizer, run on its own contiguous KV.

Each step it catches up on the verified tokens it has not seen (one forward for all requests), then runs
k - 1 more single-token forwards, all requests batched together (draft_runner.py). A request's KV slot is
kept across steps; after verification only the prefix that still agrees with the verified tokens is kept
(rolled back by feeding from a lower position; the stale rows are simply overwritten).

With a ``confidence`` threshold a request stops drafting at the first token the draft itself gives less
than that probability (softmax of its logits): such a token is likely rejected, and verifying it costs the
target more than the draft forward already spent (an MoE target's verify rows route to more experts).
Stopping depends on the draft alone, so greedy and sampled outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meshserve.engine.spec.draft_runner import DraftRunner

# (logits [R, V], request rows, draft step) -> the draft token of each row (argmax for greedy requests,
# else picked with the draw the target will use at that output position).
PickFn = Callable[[torch.Tensor, Sequence[int], int], torch.Tensor]


@dataclass
class _Seq:
    slot: int
    fed: list[int] = field(default_factory=list)  # tokens whose KV the slot holds, in order
    verified: int = 0  # leading fed tokens that were the request's own (not drafts) when last fed


class DraftModelProposer:
    """Proposes up to k tokens per request by running a small model autoregressively."""

    def __init__(
        self, loaded, k: int, max_len: int, confidence: float | None = None, max_slots: int | None = None
    ) -> None:
        self.config = loaded.config
        self.k = k
        self.confidence = confidence
        self.runner = DraftRunner(loaded.model, max_len, max_slots=max_slots)
        self.seqs: dict[str, _Seq] = {}

    @property
    def kv_bytes(self) -> int:
        """Most bytes the draft's KV cache can grow to (its ``max_slots`` slots; needs the bound)."""
        runner = self.runner
        return DraftRunner.slot_bytes(runner.model, runner.max_len) * runner.max_slots

    def remove(self, req_id: str) -> None:
        """Forget a finished, aborted or preempted request and free its KV slot."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.runner.release(seq.slot)

    @torch.inference_mode()
    def propose(
        self,
        req_ids: Sequence[str],
        contexts: Sequence[Sequence[int]],
        limits: Sequence[int],
        pick: PickFn,
    ) -> list[list[int]]:
        """Drafts, at most ``min(k, limits[i])`` each, chosen by ``pick`` from the draft model's logits. A
        request stops early at a token its draft is less sure of than ``confidence``.
        """
        rows = len(req_ids)
        n = [max(min(self.k, lim), 0) for lim in limits]
        active = [i for i in range(rows) if n[i] > 0]
        tokens = torch.zeros(rows, self.k, dtype=torch.long)
        seqs = [self._seq(req_ids[i]) for i in active]
        feeds = [self._catch_up(s, contexts[i]) for s, i in zip(seqs, active, strict=True)]
        rows_meta = [(i, s.slot, len(s.fed), len(f)) for i, s, f in zip(active, seqs, feeds, strict=True)]
        meta = torch.tensor(rows_meta, dtype=torch.long)
        meta = meta.view(-1, 4)  # no active request: [0, 4]
        rows_t, slots, starts, lens = meta.unbind(1)
        ids = torch.from_numpy(_pad(feeds))
        fed_drafts = torch.zeros(rows, dtype=torch.long)
        for step in range(max(n, default=0)):
            keep = [j for j, i in enumerate(active) if n[i] > step]  # finished requests drop out
            if not keep:  # every request stopped early
                break
            if len(keep) < len(active):
                active, index = [active[j] for j in keep], torch.tensor(keep, dtype=torch.long)
                rows_t, slots, starts, lens, ids = (t[index] for t in (rows_t, slots, starts, lens, ids))
            logits = self.runner.forward(slots, starts, ids, lens)
            picked = pick(logits, active, step)
            tokens[rows_t, step] = picked
            fed_drafts[rows_t] = step  # the drafts of steps before this one are in the KV now
            if self.confidence is not None:
                unsure = logits.softmax(-1).amax(-1) < self.confidence
                for row in rows_t[unsure].tolist():  # the draft of this step is not proposed
                    n[row] = step
            starts, lens, ids = starts + lens, torch.ones_like(lens), picked[:, None]
        drafts = [t[:m] for t, m in zip(tokens.tolist(), n, strict=True)]
        fed = fed_drafts.tolist()
        for i, seq in zip(meta[:, 0].tolist(), seqs, strict=True):
            seq.fed = [*contexts[i], *drafts[i][: fed[i]]]  # the last draft run is never fed
            seq.verified = len(contexts[i])
        return drafts

    def _seq(self, req_id: str) -> _Seq:
        seq = self.seqs.get(req_id)
        if seq is None:
            seq = self.seqs[req_id] = _Seq(self.runner.acquire())
        return seq

    @staticmethod
    def _catch_up(seq: _Seq, context: Sequence[int]) -> list[int]:
        """Tokens to feed so the slot's KV covers ``context``: keep the fed prefix that still agrees (at
        least the last context token is fed again: its logits propose the first draft)."""
        agree = seq.verified
        for fed, token in zip(seq.fed[agree:], context[agree:], strict=False):  # the drafts fed last step
            if fed != token:
                break
            agree += 1
        agree = min(agree, len(context) - 1)
        del seq.fed[agree:]
        return list(context[agree:])


def _pad(feeds: list[list[int]]) -> np.ndarray:
    """Token lists as one zero-padded int64 array [R, longest]."""
    out = np.zeros((len(feeds), max(map(len, feeds), default=0)), dtype=np.int64)
    for row, feed in enumerate(feeds):
        out[row, : len(feed)] = feed
    return out
