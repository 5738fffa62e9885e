"""Placements as lookup tables: replica choice, local slots, and the errors for bad placements."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshserve.engine.distributed.expert_map import ExpertMap, spread_placement, validate_placement
from meshserve.errors import InputError


def test_spread_placement_puts_every_expert_once_and_redundant_replicas_on_the_emptiest_ranks():
    holds = spread_placement(num_layers=2, num_experts=4, num_ranks=4, num_redundant=2)
    assert holds.shape == (2, 4, 4) and (holds[0] == holds[1]).all()
    assert holds[0].sum(axis=1).tolist() == [2, 2, 1, 1]  # experts 0 and 1 got the redundant replicas
    assert holds[0].sum(axis=0).max() - holds[0].sum(axis=0).min() <= 1


def test_pairs_go_to_a_replica_of_their_expert_and_replicas_share_the_pairs():
    holds = spread_placement(1, 4, 2, num_redundant=4)  # every expert on both ranks
    emap = ExpertMap(holds)
    experts = torch.tensor([0, 0, 0, 0, 3, 3])
    dest = emap.destinations(0, experts, rank=1)
    assert holds[0, experts, dest].all()
    assert sorted(dest[:4].tolist()) == [0, 0, 1, 1]
    assert (emap.slot_of[0, :, 0] == torch.arange(4)).all()


def test_expert_map_local_slots_follow_expert_order():
    holds = np.zeros((1, 4, 2), dtype=bool)
    holds[0, [0, 2, 3], 0] = True
    holds[0, [1, 2], 1] = True
    emap = ExpertMap(holds)
    assert emap.local_experts(0, 0).tolist() == [0, 2, 3]
    assert emap.slot_of[0, :, 1].tolist() == [-1, 0, 1, -1]
    assert (emap.destinations(0, torch.tensor([1, 1, 0]), rank=0) == torch.tensor([1, 1, 0])).all()


def test_bad_placements_name_the_field_and_the_problem():
    holds = spread_placement(2, 4, 2, 0)
    holds[1, 3] = False
    with pytest.raises(InputError, match="expert_placement: expert 3 of MoE layer 1 is on no rank"):
        validate_placement(holds, 2, 4, 2)
    with pytest.raises(InputError, match=r"expert_placement: must have shape .* \[2, 4, 3\]"):
        validate_placement(holds, 2, 4, 3)
    with pytest.raises(InputError, match="data_parallel_size: .* 8 ranks > 4 experts"):
        spread_placement(2, 4, 8, 0)


def test_the_engine_plans_with_meshserve_placement_and_never_imports_the_simulator():
    import subprocess
    import sys

    code = (
        "import sys, meshserve.engine, meshserve.engine.distributed.eplb; "
        "print(' '.join(m for m in sys.modules if m.startswith('meshserve.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "meshserve.placement" in loaded.split() and "meshserve.wafer" not in loaded
