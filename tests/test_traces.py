"""The expert-load trace: the file format shared by the engine (writer) and the wafer simulator (reader)."""

import numpy as np
import pytest

from meshserve.errors import InputError
from meshserve.traces import ExpertTrace


def make_trace(steps: int = 5, layers: int = 3, experts: int = 8, top_k: int = 2) -> ExpertTrace:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(steps, layers, experts))
    return ExpertTrace(
        counts=counts, model="tiny-moe", top_k=top_k, source="synthetic:test", meta={"seed": 0}
    )


def test_round_trip_keeps_counts_and_metadata(tmp_path):
    trace = make_trace()
    path = trace.save(tmp_path / "run.npz")
    loaded = ExpertTrace.load(path)
    np.testing.assert_array_equal(loaded.counts, trace.counts)
    assert (loaded.model, loaded.top_k, loaded.source, loaded.meta) == (
        "tiny-moe",
        2,
        "synthetic:test",
        {"seed": 0},
    )
    assert (loaded.num_steps, loaded.num_layers, loaded.num_experts) == (5, 3, 8)


def test_tokens_per_step_divides_by_top_k():
    counts = np.full((2, 4, 8), 3)  # every layer routes 24 token-expert pairs
    trace = ExpertTrace(counts=counts, model="m", top_k=2, source="test")
    np.testing.assert_allclose(trace.tokens_per_step(), [12.0, 12.0])


def test_save_leaves_no_temporary_files(tmp_path):
    make_trace().save(tmp_path / "a.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


@pytest.mark.parametrize(
    ("counts", "top_k", "field"),
    [
        (np.zeros((2, 8)), 1, "counts"),  # missing a dimension
        (-np.ones((1, 1, 4), dtype=np.int64), 1, "counts"),
        (np.zeros((1, 1, 4), dtype=np.int64), 5, "top_k"),  # more experts per token than experts
    ],
)
def test_bad_traces_name_the_field(counts, top_k, field):
    with pytest.raises(InputError) as err:
        ExpertTrace(counts=counts, model="m", top_k=top_k, source="test")
    assert err.value.field == field


def test_loading_something_else_names_the_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="junk.npz"):
        ExpertTrace.load(junk)
    with pytest.raises(InputError, match="no such file"):
        ExpertTrace.load(tmp_path / "missing.npz")


def test_draft_layers_round_trip_and_stay_out_of_the_served_tokens(tmp_path):
    """A speculative draft's MoE layer (DeepSeek's MTP) is recorded after the model's own layers, flagged."""
    counts = np.concatenate((np.full((2, 3, 8), 3), np.full((2, 1, 8), 5)), axis=1)  # drafts route more
    trace = ExpertTrace(counts=counts, model="m", top_k=2, source="engine", draft_layers=1)
    loaded = ExpertTrace.load(trace.save(tmp_path / "run.npz"))
    assert loaded.draft_layers == 1 and loaded.num_layers == 4
    np.testing.assert_allclose(loaded.tokens_per_step(), [12.0, 12.0])  # the 3 main layers' tokens
    target = loaded.target()
    assert target.draft_layers == 0 and target.counts.shape == (2, 3, 8)
    np.testing.assert_array_equal(target.counts, counts[:, :3])
    assert make_trace().target().draft_layers == 0  # a trace without one is its own target


@pytest.mark.parametrize("draft_layers", [3, -1, 1.0, True])
def test_draft_layers_leave_a_main_layer(draft_layers):
    with pytest.raises(InputError) as err:
        ExpertTrace(np.zeros((1, 3, 4), dtype=np.int64), "m", 1, "test", draft_layers=draft_layers)
    assert err.value.field == "draft_layers"
