"""The verify rule: greedy verification is exact; rejection sampling keeps the target distribution."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from meshserve.engine.spec import verify, verify_greedy

V, K, N = 5, 3, 20000


def _gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def test_greedy_accepts_matching_prefix_then_emits_target_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, K + 1, 11)
    best = logits.argmax(-1)
    drafts = best[:, :K].clone()
    drafts[0, 1] = (best[0, 1] + 1) % 11  # request 0: second draft wrong
    drafts[2, 0] = (best[2, 0] + 1) % 11  # request 2: first draft wrong
    out = verify(logits, drafts, torch.tensor([3, 2, 3]), torch.ones(3, dtype=torch.bool), [None] * 3)
    assert out.num_accepted == [1, 2, 0]
    assert out.tokens[0] == [int(best[0, 0]), int(best[0, 1])]
    assert out.tokens[1] == best[1, :3].tolist()  # both drafts accepted + bonus from row 2
    assert out.tokens[2] == [int(best[2, 0])]


def test_greedy_from_token_ids_equals_the_full_rule() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, K + 1, 6, generator=gen)  # 6 tokens: drafts match the argmax often
    drafts = torch.randint(0, 6, (64, K), generator=gen)
    num = torch.randint(0, K + 1, (64,), generator=gen)
    full = verify(logits, drafts, num, torch.ones(64, dtype=torch.bool), [None] * 64)
    fast = verify_greedy(logits.argmax(-1), drafts, num)
    assert fast == full and 0 < sum(full.num_accepted) < int(num.sum())


def test_no_drafts_is_plain_sampling() -> None:
    logits = torch.randn(2, 1, 7)
    out = verify(
        logits,
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2, dtype=torch.bool),
        [None, None],
    )
    assert out.tokens == [[int(logits[0, 0].argmax())], [int(logits[1, 0].argmax())]]


def _setup(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target rows p [K + 1, V] and draft rows q [K, V], random but fixed by the seed."""
    torch.manual_seed(seed)
    dirichlet = torch.distributions.Dirichlet(torch.ones(V))
    return dirichlet.sample((K + 1,)), dirichlet.sample((K,))


def _expected(probs: torch.Tensor, total: int) -> np.ndarray:
    f = probs.double().numpy()
    return f / f.sum() * total


def _counts(tokens: list[list[int]], index: int) -> np.ndarray:
    return np.bincount([t[index] for t in tokens if len(t) > index], minlength=V)


def test_rejection_sampling_preserves_target_distribution() -> None:
    p, q = _setup(1)
    gen = torch.Generator().manual_seed(2)
    drafts = torch.multinomial(q.repeat(N, 1), 1, generator=gen).view(N, K)
    out = verify(
        p.expand(N, -1, -1),
        drafts,
        torch.full((N,), K),
        torch.zeros(N, dtype=torch.bool),
        _gens(N),
        draft_probs=q.expand(N, -1, -1),
    )
    for pos in range(2):  # first token, and the second one where the first draft was accepted
        observed = _counts(out.tokens, pos)
        expected = _expected(p[pos], observed.sum())
        assert chisquare(observed, expected).pvalue > 1e-3
        # The test has power: the draft distribution itself is clearly rejected.
        wrong = _expected(q[pos], observed.sum())
        assert chisquare(observed, wrong).pvalue < 1e-6
    assert 0 < np.mean(out.num_accepted) < K


def test_deterministic_proposer_one_hot_q_preserves_target_distribution() -> None:
    p, _ = _setup(3)
    drafts = torch.tensor([[2, 0, 4]]).expand(N, -1)  # n-gram style: same drafts every time, q one-hot
    out = verify(p.expand(N, -1, -1), drafts, torch.full((N,), K), torch.zeros(N, dtype=torch.bool), _gens(N))
    observed = _counts(out.tokens, 0)
    assert chisquare(observed, _expected(p[0], N)).pvalue > 1e-3
    assert abs(np.mean([a > 0 for a in out.num_accepted]) - float(p[0, 2])) < 0.02


def test_seeded_request_gives_same_tokens_whatever_the_batch() -> None:
    p, q = _setup(4)
    drafts = torch.tensor([[1, 2, 3]])
    alone = verify(p[None], drafts, torch.tensor([K]), torch.tensor([False]), _gens(1, 77), q[None])
    batch = verify(
        p.expand(4, -1, -1),
        drafts.expand(4, -1),
        torch.full((4,), K),
        torch.zeros(4, dtype=torch.bool),
        _gens(3, 5) + _gens(1, 77),
        q.expand(4, -1, -1),
    )
    assert batch.tokens[3] == alone.tokens[0]


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(0, K),
    others=st.lists(st.tuples(st.integers(0, K), st.booleans()), max_size=5),
    position=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_seeded_verify_ignores_any_mix_of_neighbours(width, others, position, seed) -> None:
    """Whatever the neighbours' draft counts and greedy flags, a seeded request keeps the same tokens
    over several verify steps (its generator advances by the same draws each step)."""
    p, q = _setup(seed % 50)
    position = min(position, len(others))

    def run(neighbours: list[tuple[int, bool]], at: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        rows = neighbours[:at] + [(width, False)] + neighbours[at:]
        n = len(rows)
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        gens[at] = gen
        out = []
        for _ in range(3):
            widths, greedy = torch.tensor([w for w, _ in rows]), torch.tensor([g for _, g in rows])
            k = int(widths.max())  # the engine sizes a step's verify tensors by its widest verify
            result = verify(
                p[: k + 1].expand(n, -1, -1),
                torch.tensor([[1, 2, 3][:k]] * n),
                widths,
                greedy,
                gens,
                q[:k].expand(n, -1, -1),
                draws_per_row=K + 1,
            )
            out.append(result.tokens[at])
        return out

    assert run(others, position) == run([], 0)
