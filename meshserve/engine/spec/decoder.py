"""SpecDecoder: the engine's side of speculative decoding (propose before a step, verify after it).

Before scheduling, every running request that is about to decode gets up to k drafts in
``request.spec_token_ids``; the scheduler turns it into a verify item of 1 + drafts tokens in the same
forward as everything else. After the forward, ``verify`` maps each verify item's logits rows to the
tokens it keeps. Counters give the acceptance rate and the mean accepted length (tokens per verify).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshserve.engine.grammar import apply_bitmask, verify_bitmask
from meshserve.engine.request import Request
from meshserve.engine.sampler import pick
from meshserve.engine.scheduler import WorkItem
from meshserve.engine.spec.config import SpecConfig
from meshserve.engine.spec.draft import DraftModelProposer
from meshserve.engine.spec.draft_runner import unsupported_options
from meshserve.engine.spec.mtp import MTPProposer
from meshserve.engine.spec.ngram import NgramProposer
from meshserve.engine.spec.verify import verify
from meshserve.errors import InputError, require
from meshserve.models.config import ModelConfig, dtype_name
from meshserve.models.decoder import DecoderLM
from meshserve.models.loader import load_model


class SpecDecoder:
    """Owns the proposer and the acceptance counters."""

    def __init__(
        self, config: SpecConfig, target: ModelConfig, max_model_len: int, max_num_seqs: int, block_size: int
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.kv_bytes = 0  # most bytes the proposer's own KV cache can take (none for n-gram lookup)
        self._mtp = (max_model_len, block_size, max_num_seqs)
        vocab_size, dtype = target.vocab_size, dtype_name(target.dtype)
        self.proposer: NgramProposer | DraftModelProposer | MTPProposer | None = None
        if config.method == "ngram":
            self.proposer = NgramProposer(self.k, config.prompt_lookup_max, config.prompt_lookup_min)
        elif config.method == "mtp":  # the proposer needs the loaded target: attach() makes it
            require(
                target.num_mtp_layers > 0,
                "speculative_config.method",
                f"'mtp' needs a model with a multi-token-prediction layer; {target.name} ({target.arch}) "
                "has none (config.json num_nextn_predict_layers)",
            )
            target.use_mtp = True  # the model is built with its MTP layer, and the fit check counts it
            self.kv_bytes = MTPProposer.cache_bytes(target, max_model_len, block_size, max_num_seqs)
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
            self.kv_bytes = self.proposer.kv_bytes
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.verify_steps = 0

    def attach(self, model: DecoderLM) -> None:
        """Give the proposer the loaded target model (the MTP layer's home; others need nothing of it)."""
        if self.config.method == "mtp":
            max_len, block_size, slots = self._mtp
            self.proposer = MTPProposer(model, self.k, max_len, block_size, slots)

    def observe(self, items: Sequence[WorkItem], hidden: torch.Tensor) -> None:
        """The target's hidden rows of the step that ran ``items`` (the MTP proposer drafts from them)."""
        if isinstance(self.proposer, MTPProposer):
            self.proposer.observe(items, hidden)

    def propose(self, running: Sequence[Request], max_model_len: int, rope_switch: int | None = None) -> None:
        """Set drafts on running requests about to decode (none for requests that want logprobs or whose
        logits are processed: penalties, bias, min_tokens), and none at all while more requests run than
        ``disable_by_batch_size``. A request at most ``rope_switch`` tokens long (LongRoPE's original
        context) drafts no further than that length: the engine recomputes it once it passes it."""
        off = self.config.disable_by_batch_size
        if off is not None and len(running) > off:
            return
        wanted, limits = [], []
        for r in running:
            decoding = r.num_output_tokens > 0 and r.num_tokens - r.num_computed_tokens == 1
            if decoding and r.params.logprobs is None and not r.params.processes_logits:
                # Never draft past max_tokens (one token always comes from the target) or max_model_len.
                limit = min(self.k, r.max_tokens - r.num_output_tokens - 1, max_model_len - r.num_tokens)
                if rope_switch is not None and r.num_tokens <= rope_switch:
                    limit = min(limit, rope_switch - r.num_tokens)
                if limit > 0:
                    wanted.append(r)
                    limits.append(limit)
        if not wanted:
            return
        contexts = [r.token_ids for r in wanted]
        if isinstance(self.proposer, NgramProposer):
            drafts = self.proposer.propose(contexts, limits)
        else:

            def pick_drafts(logits: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
                """Draft ``step`` of requests ``rows``, picked with the draws the target will use there."""
                reqs = [wanted[i] for i in rows]
                positions = [r.num_output_tokens + step for r in reqs]
                return pick(logits, [r.params for r in reqs], [r.seed for r in reqs], positions)

            drafts = self.proposer.propose([r.request_id for r in wanted], contexts, limits, pick_drafts)
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
        are ``num_rows[i] - 1`` leading tokens of ``requests[i].spec_token_ids``. Row j of an item is output
        position ``num_output_tokens + j``: the target picks there as a decode would (see verify.py).
        """
        n = torch.as_tensor(list(num_rows), dtype=torch.long)
        width = int(n.max())
        offsets = torch.arange(width).clamp(max=n[:, None] - 1)  # pad rows repeat the item's last row
        rows = torch.as_tensor(list(first_rows), dtype=torch.long)[:, None] + offsets
        own = [r.spec_token_ids[: m - 1] for r, m in zip(requests, n.tolist(), strict=True)]
        padded = [d + [0] * (width - 1 - len(d)) for d in own]
        drafts = torch.tensor(padded, dtype=torch.long).view(len(requests), width - 1)
        params = [r.params for r in requests for _ in range(width)]
        seeds = [r.seed for r in requests for _ in range(width)]
        positions = [r.num_output_tokens + j for r in requests for j in range(width)]
        # a structured request's rows are masked as its decodes would be, after the drafts before them
        masks = verify_bitmask([r.matcher for r in requests], own, width, logits.shape[1])
        target_logits = apply_bitmask(logits[rows.flatten()].float(), masks)
        target = pick(target_logits, params, seeds, positions).view(rows.shape)
        out = verify(target, drafts, n - 1)
        self.draft_tokens += int((n - 1).sum())
        self.accepted_tokens += sum(out.num_accepted)
        self.verify_steps += len(requests)
        return out.tokens

    def remove(self, request_id: str) -> None:
        """Forget a finished, aborted or preempted request (frees its draft-model or MTP KV)."""
        if isinstance(self.proposer, DraftModelProposer | MTPProposer):
            self.proposer.remove(request_id)

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
