"""SpecDecoder: the engine's side of speculative decoding (propose before a step, verify after it).

Before scheduling, every running request that is about to decode gets up to k drafts in
``request.spec_token_ids``; the scheduler turns it into a verify item of 1 + drafts tokens in the same
forward as everything else. After the forward, ``verify`` maps each verify item's logits rows to the
tokens it keeps. Counters give the acceptance rate and the mean accepted length (tokens per verify).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from meshserve.engine.request import Request
from meshserve.engine.spec.config import SpecConfig
from meshserve.engine.spec.draft import DraftModelProposer
from meshserve.engine.spec.draft_runner import unsupported_options
from meshserve.engine.spec.ngram import NgramProposer
from meshserve.engine.spec.verify import verify, verify_greedy
from meshserve.errors import InputError
from meshserve.models.loader import load_model

# (logits [N, V], params of each row) -> filtered probabilities [N, V] (the sampler's distribution).
ProbsFn = Callable[[torch.Tensor, list], torch.Tensor]


class SpecDecoder:
    """Owns the proposer and the acceptance counters."""

    def __init__(
        self,
        config: SpecConfig,
        vocab_size: int,
        dtype: str,
        max_model_len: int,
        probs: ProbsFn,
        generator: torch.Generator,
        max_num_seqs: int,
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.probs = probs
        self.generator = generator  # unseeded requests share the sampler's generator
        if config.method == "ngram":
            self.proposer: NgramProposer | DraftModelProposer = NgramProposer(
                self.k, config.prompt_lookup_max, config.prompt_lookup_min
            )
        else:
            try:
                draft = load_model(config.model, dtype)
            except InputError as err:  # name the draft, so it is not taken for the target model
                raise InputError("speculative_config.model", f"draft model {config.model}: {err}") from None
            if draft.config.vocab_size != vocab_size:
                raise InputError(
                    "speculative_config.model",
                    f"draft vocab_size {draft.config.vocab_size} differs from the target's {vocab_size}",
                )
            missing = unsupported_options(draft.config)
            if missing:
                raise InputError(
                    "speculative_config.model",
                    f"draft model {config.model} ({draft.config.arch}) uses {', '.join(missing)}, which "
                    "the draft runner does not implement; use a Llama, Qwen or Mixtral-style draft, or ngram",
                )
            # A request drafts only while at most disable_by_batch_size run, and gives its slot back when it
            # stops running: no more slots than that (and max_num_seqs) are ever held at once.
            off = config.disable_by_batch_size
            slots = max_num_seqs if off is None else max(1, min(off, max_num_seqs))
            self.proposer = DraftModelProposer(
                draft, self.k, max_model_len, config.draft_confidence, max_slots=slots
            )
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q [k, V] of its current drafts
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0

    @property
    def kv_bytes(self) -> int:
        """Most bytes the proposer's own KV cache can take (the draft model's; 0 for n-gram lookup)."""
        return self.proposer.kv_bytes if isinstance(self.proposer, DraftModelProposer) else 0

    def _generator(self, request: Request) -> torch.Generator:
        return request.generator if request.generator is not None else self.generator

    def propose(self, running: Sequence[Request], max_model_len: int) -> None:
        """Set drafts on running requests about to decode (none for requests that want logprobs or whose
        logits are processed: penalties, bias, min_tokens), and none at all while more requests run than
        ``disable_by_batch_size``."""
        off = self.config.disable_by_batch_size
        if off is not None and len(running) > off:
            return
        wanted, limits = [], []
        for r in running:
            decoding = r.num_output_tokens > 0 and r.num_tokens - r.num_computed_tokens == 1
            if decoding and r.params.logprobs is None and not r.params.processes_logits:
                # Never draft past max_tokens (one token always comes from the target) or max_model_len.
                limit = min(self.k, r.max_tokens - r.num_output_tokens - 1, max_model_len - r.num_tokens)
                if limit > 0:
                    wanted.append(r)
                    limits.append(limit)
        if not wanted:
            return
        contexts = [r.token_ids for r in wanted]
        if isinstance(self.proposer, NgramProposer):
            drafts = self.proposer.propose(contexts, limits)
        else:
            params = [r.params for r in wanted]
            drafts, q = self.proposer.propose(
                [r.request_id for r in wanted],
                contexts,
                limits,
                [r.params.greedy for r in wanted],
                [self._generator(r) for r in wanted],
                lambda logits, rows: self.probs(logits, [params[i] for i in rows]),
            )
            if q is not None:  # greedy requests need no q: verification compares tokens
                self.draft_probs.update(
                    (r.request_id, q[i]) for i, r in enumerate(wanted) if not r.params.greedy
                )
        for r, d in zip(wanted, drafts, strict=True):
            r.spec_token_ids = d

    def verify(
        self,
        requests: Sequence[Request],
        logits: torch.Tensor,
        first_rows: Sequence[int],
        num_rows: Sequence[int],
    ) -> list[list[int]]:
        """Tokens kept by each verify item: its accepted drafts plus one token from the target.

        Item i's logits are rows ``first_rows[i] .. first_rows[i] + num_rows[i]`` of ``logits``; its drafts
        are ``num_rows[i] - 1`` leading tokens of ``requests[i].spec_token_ids``.
        """
        n = torch.as_tensor(list(num_rows), dtype=torch.long)
        width = int(n.max())
        offsets = torch.arange(width).clamp(max=n[:, None] - 1)  # pad rows repeat the item's last row
        rows = torch.as_tensor(list(first_rows), dtype=torch.long)[:, None] + offsets
        padded = [
            r.spec_token_ids[: m - 1] + [0] * (width - m) for r, m in zip(requests, n.tolist(), strict=True)
        ]
        drafts = torch.tensor(padded, dtype=torch.long).view(len(requests), width - 1)
        greedy = torch.tensor([r.params.greedy for r in requests])
        if bool(greedy.all()):  # tokens only: the argmax of each verify row, no [R, K + 1, V] copy
            out = verify_greedy(logits[rows.flatten()].argmax(-1).view(rows.shape), drafts, n - 1)
        else:
            target = logits[rows].float()  # [R, K + 1, V]
            sampled = torch.nonzero(~greedy).flatten().tolist()
            params = [requests[i].params for i in sampled for _ in range(width)]
            target[sampled] = self.probs(target[sampled].flatten(0, 1), params).view(len(sampled), width, -1)
            q = self._gather_draft_probs(requests, width - 1, logits.shape[-1])
            out = verify(
                target,
                drafts,
                n - 1,
                greedy,
                [self._generator(r) for r in requests],
                q,
                draws_per_row=self.k + 1,
            )
        self.draft_tokens += int((n - 1).sum())
        self.accepted_tokens += sum(out.num_accepted)
        self.verify_steps += len(requests)
        return out.tokens

    def _gather_draft_probs(self, requests: Sequence[Request], k: int, vocab: int) -> torch.Tensor | None:
        """q [R, k, V] of the drafts (zero rows for greedy requests, which never read them)."""
        if isinstance(self.proposer, NgramProposer):
            return None
        zero = torch.zeros(k, vocab)
        return torch.stack(
            [self.draft_probs[r.request_id][:k] if not r.params.greedy else zero for r in requests]
        )

    def remove(self, request_id: str) -> None:
        """Forget a finished, aborted or preempted request (frees its draft-model KV)."""
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.remove(request_id)
            self.draft_probs.pop(request_id, None)

    def counters(self) -> dict[str, int]:
        return {
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "verify_steps": self.verify_steps,
        }

    def stats(self) -> dict[str, float]:
        """Acceptance rate (accepted / proposed drafts) and mean accepted length (tokens per verify)."""
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        mean = (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0
        return {"spec_acceptance_rate": rate, "spec_mean_accepted_len": mean}
