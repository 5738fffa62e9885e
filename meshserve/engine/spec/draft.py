"""Draft-model proposer: a smaller model with the target's tokenizer, run with its own paged KV cache.

Each step it catches up on the verified tokens it has not seen (one forward for all requests), then runs
k - 1 more single-token forwards, all requests batched together. Its KV for a request is kept across steps;
after verification only the prefix that still agrees with the verified tokens is kept (rolled back by
lowering the computed count; the slots are simply overwritten later).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meshserve.engine.runner import batch_metadata

# (logits [R, V], request rows) -> probabilities [R, V] after each request's temperature / top-k / top-p.
ProbsFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds, in order


class DraftModelProposer:
    """Proposes up to k tokens per request by running a small model autoregressively."""

    def __init__(self, loaded, k: int, num_blocks: int, block_size: int) -> None:
        self.model = loaded.model
        self.config = loaded.config
        self.k = k
        self.block_size = block_size
        cfg = loaded.config
        dtype = next(self.model.parameters()).dtype
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
                          for _ in range(cfg.num_layers)]
        self.free = list(range(num_blocks - 1, -1, -1))
        self.seqs: dict[str, _Seq] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def remove(self, req_id: str) -> None:
        """Forget a finished, aborted or preempted request and return its draft blocks."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.free.extend(reversed(seq.blocks))

    @torch.inference_mode()
    def propose(self, req_ids: Sequence[str], contexts: Sequence[Sequence[int]], limits: Sequence[int],
                greedy: Sequence[bool], generators: Sequence[torch.Generator | None],
                to_probs: ProbsFn) -> tuple[list[list[int]], torch.Tensor | None]:
        """Drafts (at most ``min(k, limits[i])`` each) and their distributions q [R, k, V].

        Greedy requests take the draft's argmax and need no q (greedy verification compares tokens):
        their q rows stay zero, and q is None when every request is greedy (no softmax is computed).
        Others sample q with their own generator.
        """
        rows = len(req_ids)
        n = torch.tensor([min(self.k, lim) if self._reserve(rid, len(ctx) + min(self.k, lim) - 1) else 0
                          for rid, ctx, lim in zip(req_ids, contexts, limits, strict=True)], dtype=torch.long)
        tokens = torch.zeros(rows, self.k, dtype=torch.long)
        sampled_rows = [i for i in range(rows) if not greedy[i] and n[i] > 0]
        q = torch.zeros(rows, max(self.k, 1), self.config.vocab_size) if sampled_rows else None
        active = torch.nonzero(n > 0).flatten()
        feeds = [self._catch_up(req_ids[i], contexts[i]) for i in active.tolist()]
        for step in range(int(n.max()) if rows else 0):
            keep = n[active] > step  # requests whose drafts are done drop out of later forwards
            if not bool(keep.all()):
                feeds = [f for f, kept in zip(feeds, keep.tolist(), strict=True) if kept]
                active = active[keep]
            ids = active.tolist()
            logits = self._forward([req_ids[i] for i in ids], feeds)
            picked = logits.argmax(-1)
            if q is not None:
                sampled = [row for row, i in enumerate(ids) if not greedy[i]]
                if sampled:
                    probs = to_probs(logits[sampled], [ids[row] for row in sampled])
                    q[active[sampled], step] = probs
                    for j, row in enumerate(sampled):
                        picked[row] = torch.multinomial(probs[j], 1, generator=generators[ids[row]])[0]
            tokens[active, step] = picked
            feeds = [[t] for t in picked.tolist()]
        lens = n.tolist()
        return [t[:m] for t, m in zip(tokens.tolist(), lens, strict=True)], q

    def _reserve(self, req_id: str, num_tokens: int) -> bool:
        """Make the request's draft block table cover ``num_tokens`` KV slots; False if out of blocks."""
        seq = self.seqs.setdefault(req_id, _Seq())
        need = -(-num_tokens // self.block_size) - len(seq.blocks)
        if need > len(self.free):
            return False
        seq.blocks.extend(self.free.pop() for _ in range(max(need, 0)))
        return True

    def _catch_up(self, req_id: str, context: Sequence[int]) -> list[int]:
        """Tokens to feed so the draft KV covers ``context``: keep only the prefix that still agrees."""
        seq = self.seqs[req_id]
        ctx = np.asarray(context, dtype=np.int64)
        fed = np.asarray(seq.fed[: len(ctx) - 1], dtype=np.int64)
        agree = int(np.cumprod(fed == ctx[: len(fed)]).sum())
        del seq.fed[agree:]
        return list(context[agree:])

    def _forward(self, req_ids: Sequence[str], feeds: Sequence[list[int]]) -> torch.Tensor:
        """One forward of the draft model over all requests' feeds; logits at each request's last token."""
        seqs = [self.seqs[r] for r in req_ids]
        starts = np.array([len(s.fed) for s in seqs], dtype=np.int64)
        q_lens = np.array([len(f) for f in feeds], dtype=np.int64)
        meta = batch_metadata(starts, q_lens, np.ones_like(q_lens), [s.blocks for s in seqs], self.block_size)
        ids = torch.as_tensor(np.concatenate([np.asarray(f, dtype=np.int64) for f in feeds]))
        hidden = self.model(ids, meta, self.kv_caches)
        for s, f in zip(seqs, feeds, strict=True):
            s.fed.extend(f)
        return self.model.compute_logits(hidden[meta.logits_indices]).float()
