"""Per-request changes to logits before sampling: min_tokens, logit_bias and the three penalties.

Applied to the rows of requests that ask for any of them (``SamplingParams.processes_logits``), in
vLLM's order: min_tokens and logit_bias, then repetition, frequency and presence penalties. Every
step is a tensor op over all such rows; token histories become one padded tensor, counted with
``scatter_add``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshserve.engine.request import Request


def process_logits(
    logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """Logits [R, V] for ``requests`` (one row each) with their processors applied (a new float tensor)."""
    rows = [i for i, r in enumerate(requests) if r.params.processes_logits]
    logits = logits.float()
    if not rows:
        return logits
    logits = logits.clone()
    _min_tokens(logits, [(i, requests[i]) for i in rows], eos_token_ids)
    _logit_bias(logits, [(i, requests[i]) for i in rows])
    penalised = [i for i in rows if _has_penalty(requests[i])]
    if penalised:
        _penalties(logits, penalised, [requests[i] for i in penalised])
    return logits


def _has_penalty(request: Request) -> bool:
    p = request.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1)


def _min_tokens(logits: torch.Tensor, rows: list[tuple[int, Request]], eos_token_ids: Sequence[int]) -> None:
    """Before min_tokens outputs, EOS and the stop token ids cannot be sampled."""
    index_rows, index_tokens = [], []
    for i, r in rows:
        if r.num_output_tokens < r.params.min_tokens:
            banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(eos_token_ids))
            index_rows += [i] * len(banned)
            index_tokens += sorted(banned)
    if index_rows:
        logits[torch.tensor(index_rows), torch.tensor(index_tokens)] = float("-inf")


def _logit_bias(logits: torch.Tensor, rows: list[tuple[int, Request]]) -> None:
    index_rows, index_tokens, values = [], [], []
    for i, r in rows:
        for token, bias in (r.params.logit_bias or {}).items():
            index_rows.append(i)
            index_tokens.append(token)
            values.append(bias)
    if index_rows:
        logits.index_put_(
            (torch.tensor(index_rows), torch.tensor(index_tokens)), torch.tensor(values), accumulate=True
        )


def _counts(histories: list[list[int]], vocab: int) -> torch.Tensor:
    """[R, V] occurrences of each token in each history (padding goes to an extra, dropped column)."""
    width = max((len(h) for h in histories), default=0)
    padded = torch.full((len(histories), max(width, 1)), vocab, dtype=torch.long)
    for j, h in enumerate(histories):
        if h:
            padded[j, : len(h)] = torch.as_tensor(h, dtype=torch.long)
    counts = torch.zeros(len(histories), vocab + 1)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _penalties(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    vocab = logits.shape[1]
    index = torch.tensor(rows)
    x = logits[index]
    output = _counts([r.output_token_ids for r in requests], vocab)
    prompt_seen = _counts([r.token_ids[: r.num_prompt_tokens] for r in requests], vocab) > 0
    rep = torch.tensor([r.params.repetition_penalty for r in requests]).unsqueeze(1)
    seen = prompt_seen | (output > 0)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([r.params.frequency_penalty for r in requests]).unsqueeze(1)
    presence = torch.tensor([r.params.presence_penalty for r in requests]).unsqueeze(1)
    x = x - freq * output - presence * (output > 0).float()
    logits[index] = x
