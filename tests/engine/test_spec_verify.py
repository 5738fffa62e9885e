"""The verify rule: every kept token is the target's own token at its position, so the output is the
target's, greedy or sampled, and sampled tokens keep the target distribution."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from meshserve.engine.sampler import pick
from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.spec import verify

V, K, N = 5, 3, 20000


def test_accepts_the_matching_prefix_then_emits_the_targets_token() -> None:
    torch.manual_seed(0)
    best = torch.randn(3, K + 1, 11).argmax(-1)
    drafts = best[:, :K].clone()
    drafts[0, 1] = (best[0, 1] + 1) % 11  # request 0: second draft wrong
    drafts[2, 0] = (best[2, 0] + 1) % 11  # request 2: first draft wrong
    out = verify(best, drafts, torch.tensor([3, 2, 3]))
    assert out.num_accepted == [1, 2, 0]
    assert out.tokens[0] == [int(best[0, 0]), int(best[0, 1])]
    assert out.tokens[1] == best[1, :3].tolist()  # both drafts accepted + bonus from row 2
    assert out.tokens[2] == [int(best[2, 0])]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=K + 1, max_size=K + 1), st.integers(0, K)), min_size=1
    ),
    noise=st.lists(st.integers(0, 3), min_size=K, max_size=K),
)
def test_kept_tokens_are_the_targets_tokens_at_their_rows(rows, noise) -> None:
    """Whatever the drafts, request i keeps target_ids[i, :a + 1] with a the longest matching prefix."""
    target = torch.tensor([t for t, _ in rows])
    num = torch.tensor([m for _, m in rows])
    drafts = torch.where(torch.tensor(noise) == 0, (target[:, :K] + 1) % 4, target[:, :K])  # some wrong
    out = verify(target, drafts, num)
    for i, (tokens, accepted) in enumerate(zip(out.tokens, out.num_accepted, strict=True)):
        assert tokens == target[i, : accepted + 1].tolist()
        matching = (drafts[i] == target[i, :K]).int().cumprod(0).sum().item()
        assert accepted == min(matching, int(num[i]))


def _dirichlet(seed: int, rows: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.Dirichlet(torch.ones(V)).sample((rows,))


def test_a_fixed_draft_is_accepted_with_its_target_probability_and_outputs_follow_p() -> None:
    """An n-gram style draft d (one-hot q): accepted with probability p(d), as rejection sampling does;
    the first token of N seeded requests follows p."""
    p = _dirichlet(1, 1)
    params = [SamplingParams(temperature=1.0)] * N
    target = pick(p.log().expand(N, -1), params, range(N), [0] * N)
    out = verify(torch.stack([target, target], 1), torch.full((N, 1), 2), torch.ones(N, dtype=torch.long))
    first = np.bincount([t[0] for t in out.tokens], minlength=V)
    assert chisquare(first, p[0].double().numpy() * N).pvalue > 1e-3
    assert abs(np.mean(out.num_accepted) - float(p[0, 2])) < 0.02


def test_a_draft_model_picking_with_the_same_draws_is_accepted_when_it_agrees() -> None:
    """A draft that picks from q with the target's draws: always accepted when q = p, and accepted
    at least as often as a draft sampled independently of them when q is near p."""
    p = _dirichlet(2, 1).expand(N, -1)
    q = (p + 0.05 * _dirichlet(3, 1)).log()
    params = [SamplingParams(temperature=1.0)] * N
    first = [0] * N
    target = pick(p.log(), params, range(N), first)
    assert torch.equal(pick(p.log(), params, range(N), first), target)
    coupled = (pick(q, params, range(N), first) == target).float().mean()
    independent = (pick(q, params, range(N, 2 * N), first) == target).float().mean()
    assert coupled > 0.9 and coupled > independent + 0.2
