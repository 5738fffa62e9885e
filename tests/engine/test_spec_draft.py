"""Draft-model proposer: its own contiguous KV slots, batched across requests, rolled back after
verification."""

from __future__ import annotations

import pytest
import torch

from meshserve.engine.spec import DraftModelProposer
from meshserve.models import load_model
from meshserve.testing import make_tiny_model


def _argmax(logits: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
    return logits.argmax(-1)


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model(tmp_path_factory.mktemp("draft") / "m", arch="llama", seed=3, num_hidden_layers=1)
    return load_model(path)


def _greedy_continuation(loaded, context: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence for every token (a fresh proposer per token)."""
    seq = list(context)
    for _ in range(n):
        fresh = DraftModelProposer(loaded, k=1, max_len=64)
        seq.append(fresh.propose(["r"], [seq], [1], _argmax)[0][0])
    return seq[len(context) :]


def test_greedy_drafts_follow_the_draft_models_own_greedy_path(draft) -> None:
    prop = DraftModelProposer(draft, k=4, max_len=64)
    a, b = list(range(40, 57)), list(range(90, 96))
    drafts = prop.propose(["a", "b"], [a, b], [4, 2], _argmax)
    assert drafts == [_greedy_continuation(draft, a, 4), _greedy_continuation(draft, b, 2)]


def test_each_draft_is_the_pick_for_its_request_and_step(draft) -> None:
    """``pick`` sees the rows still drafting (request indexes) and the step, and its token is the draft."""
    prop = DraftModelProposer(draft, k=3, max_len=64)
    calls = []

    def pick(logits: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
        calls.append((list(rows), step))
        return torch.tensor([100 * i + step for i in rows])

    drafts = prop.propose(["a", "b"], [list(range(40, 50)), list(range(70, 75))], [3, 2], pick)
    assert drafts == [[0, 1, 2], [100, 101]] and calls == [([0, 1], 0), ([0, 1], 1), ([0], 2)]


def test_rollback_after_partial_acceptance_keeps_drafts_exact(draft) -> None:
    prop = DraftModelProposer(draft, k=3, max_len=64)
    ctx = list(range(60, 70))
    first = prop.propose(["r"], [ctx], [3], _argmax)
    # The target accepted one draft and then emitted a different token: the rest of the draft KV is stale.
    verified = ctx + first[0][:1] + [7]
    again = prop.propose(["r"], [verified], [3], _argmax)
    assert again[0] == _greedy_continuation(draft, verified, 3)


def test_slots_return_on_remove_and_the_cache_grows_past_its_first_slots(draft) -> None:
    prop = DraftModelProposer(draft, k=2, max_len=64)
    first = prop.runner.num_slots
    names = [f"r{i}" for i in range(first + 1)]
    contexts = [list(range(10 + i, 22 + i)) for i in range(first + 1)]
    drafts = prop.propose(names, contexts, [2] * len(names), _argmax)
    assert prop.runner.num_slots == 2 * first and all(len(d) == 2 for d in drafts)
    assert drafts[-1] == _greedy_continuation(draft, contexts[-1], 2)  # the slot past the first ones works
    for name in names:
        prop.remove(name)
    assert not prop.seqs and sorted(prop.runner.free_slots) == list(range(2 * first))


def test_requests_feeding_different_lengths_share_a_forward(draft) -> None:
    """A long catch-up (a prompt) beside one-token feeds: padding never leaks into the real rows."""
    prop = DraftModelProposer(draft, k=3, max_len=64)
    short, long_ = list(range(40, 45)), list(range(50, 80))
    prop.propose(["s"], [short], [3], _argmax)
    drafts = prop.propose(["s", "l"], [short + [9], long_], [3, 3], _argmax)
    assert drafts == [_greedy_continuation(draft, short + [9], 3), _greedy_continuation(draft, long_, 3)]


def test_draft_identical_to_target_is_always_accepted(tiny_model_dir, tmp_path):
    from meshserve.engine import LLM, SamplingParams
    from meshserve.engine.spec.layer_skip import write_layer_skip_draft

    target = tiny_model_dir("llama")
    twin = write_layer_skip_draft(target, tmp_path / "twin", load_model(target).config.num_layers)
    llm = LLM(
        str(target),
        max_num_batched_tokens=64,
        max_num_seqs=4,
        speculative_config={"method": "draft_model", "model": str(twin), "num_speculative_tokens": 3},
    )
    llm.generate(
        [[1, 5, 6, 7], [1] + list(range(60, 90))],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )
    stats = llm.engine.last_stats
    assert stats["spec_acceptance_rate"] > 0.95 and stats["spec_mean_accepted_len"] > 3.5


def test_draft_with_another_vocabulary_is_refused(tiny_model_dir):
    from meshserve.engine import LLM
    from meshserve.errors import InputError

    other = tiny_model_dir("llama", vocab_size=600)
    with pytest.raises(InputError) as err:
        LLM(str(tiny_model_dir("llama")), speculative_config={"method": "draft_model", "model": str(other)})
    assert err.value.field == "speculative_config.model" and "600" in err.value.message


@pytest.mark.parametrize(
    ("arch", "named"),
    [("phi3", "partial_rotary_factor"), ("olmoe", "qk_norm_per_head"), ("gemma2", "norm_offset")],
)
def test_a_draft_the_lean_runner_cannot_run_is_refused(arch, named, tiny_model_dir):
    """Phi-4-mini's partial rotary and OLMoE's full-width q/k norm crashed the draft's forward mid-serve;
    Gemma's norms and GELU silently ran as Llama's. Each is refused up front, naming what is missing."""
    from meshserve.engine import LLM
    from meshserve.errors import InputError

    spec = {"method": "draft_model", "model": str(tiny_model_dir(arch))}
    with pytest.raises(InputError) as err:
        LLM(str(tiny_model_dir(arch)), speculative_config=spec, max_model_len=64)
    assert err.value.field == "speculative_config.model" and named in err.value.message


def test_a_confidence_threshold_stops_drafting_at_the_first_unsure_token(draft) -> None:
    ctx = list(range(40, 57))
    full = DraftModelProposer(draft, k=4, max_len=64).propose(["r"], [ctx], [4], _argmax)
    sure = []  # the draft's own probability of each of its greedy tokens
    for j in range(4):
        runner = DraftModelProposer(draft, k=1, max_len=64).runner
        slot = torch.tensor([runner.acquire()])
        seq = ctx + full[0][:j]
        probs = runner.forward(
            slot, torch.zeros(1, dtype=torch.long), torch.tensor([seq]), torch.tensor([len(seq)])
        ).softmax(-1)
        sure.append(float(probs.max()))
    threshold = sorted(sure)[1] + 1e-6  # the two least sure tokens fall below it
    first_unsure = next(j for j, p in enumerate(sure) if p < threshold)
    prop = DraftModelProposer(draft, k=4, max_len=64, confidence=threshold)
    drafts = prop.propose(["r"], [ctx], [4], _argmax)
    assert drafts[0] == full[0][:first_unsure]
    # The KV kept is exactly the fed prefix: the next step's drafts are still the draft's greedy path.
    verified = ctx + full[0][:first_unsure] + [7]
    again = DraftModelProposer(draft, k=2, max_len=64).propose(["x"], [verified], [2], _argmax)
    prop.confidence = None
    assert prop.propose(["r"], [verified], [2], _argmax) == again


def test_a_confidence_above_every_tokens_proposes_nothing(draft) -> None:
    prop = DraftModelProposer(draft, k=3, max_len=64, confidence=0.999999)
    drafts = prop.propose(["a", "b"], [list(range(40, 50)), list(range(60, 66))], [3, 3], _argmax)
    assert drafts == [[], []]
