"""prompt_logprobs: log-probabilities of each prompt token given the tokens before it (vLLM's field).

A request that asks has logits computed at every row of its prompt chunks (``prompt_logits``), not only
at the sampling row. Row r of a chunk starting at position s predicts the token at s + r + 1; those
that are prompt tokens are recorded, once each (a chunk recomputed after preemption adds nothing).
Such requests do not take cached prefix blocks: a cached prefix has no logits to read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshserve.engine.request import Request


def wants_prompt_logits(request: Request) -> bool:
    """Still has prompt tokens whose logprobs are not recorded."""
    collected = request.prompt_logprobs
    return collected is not None and len(collected) < request.num_prompt_tokens


def record_prompt_logprobs(
    logits: torch.Tensor,
    requests: Sequence[Request],
    starts: Sequence[int],
    lengths: Sequence[int],
    rows: Sequence[int],
) -> None:
    """Append to each request's ``prompt_logprobs`` from the logits of its chunk: ``lengths[i]`` tokens from
    position ``starts[i]``, whose logits are rows ``rows[i] ..`` of ``logits``."""
    picks, owners = [], []  # logits row; (request index, predicted position)
    for i, (request, start, n, row) in enumerate(zip(requests, starts, lengths, rows, strict=True)):
        for position in range(
            max(start + 1, len(request.prompt_logprobs)), min(request.num_prompt_tokens, start + n + 1)
        ):
            picks.append(row + position - start - 1)
            owners.append((i, position))
    if not picks:
        return
    logp = logits[torch.tensor(picks)].float().log_softmax(dim=-1)
    k = max(max(requests[i].params.prompt_logprobs for i, _ in owners), 1)
    top_vals, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))
    targets = torch.tensor([requests[i].token_ids[p] for i, p in owners])
    chosen = logp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    for j, (i, position) in enumerate(owners):
        request = requests[i]
        n = request.params.prompt_logprobs
        entry = dict(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        entry[request.token_ids[position]] = chosen[j]
        request.prompt_logprobs.append(entry)
