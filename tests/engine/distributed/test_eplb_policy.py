"""The live balancer plans and scores under the ranks' own dispatch rule (ep_dispatch)."""

import numpy as np
import pytest

from meshserve.engine.distributed.config import EPLBConfig
from meshserve.engine.distributed.eplb import balancedness, live_policy
from meshserve.placement import Placement, make_balancer, slots_per_device, static_placement
from meshserve.placement.dispatch import join_replicas
from tests.placement.test_balancers import skewed_load


def test_a_balanced_dispatch_scores_a_table_by_its_levelled_loads():
    holds = np.array([[[True, True], [True, False]]])  # expert 0 on both ranks, expert 1 on rank 0
    table, load = Placement(holds, 2), np.array([[10.0, 6.0]])
    # even: rank 0 serves 5 + 6, rank 1 serves 5; balanced: 2 + 6 and 8
    assert balancedness(table, load, live_policy(EPLBConfig(), "even")) == pytest.approx(8 / 11)
    assert balancedness(table, load, live_policy(EPLBConfig(), "balanced")) == pytest.approx(1.0)


def test_a_balanced_dispatch_gets_each_plan_with_its_replica_groups_joined():
    ranks, experts = 16, 32  # as test_dispatch.eplb_plan: EPLB leaves groups of two ranks
    cfg = EPLBConfig(num_redundant_experts=ranks)
    load = skewed_load(4, experts, 0)
    base = static_placement(4, experts, ranks, slots_per_device(experts, ranks, ranks))
    hops = 1 - np.eye(ranks)
    plans = {}
    for rule in ("even", "balanced"):
        policy = live_policy(cfg, rule)
        planner = make_balancer(cfg.balancer, policy, hops, cfg.num_redundant_experts)
        plans[rule] = policy.applied(planner.plan(load, base, base), load)
    np.testing.assert_array_equal(plans["balanced"].holds, join_replicas(plans["even"], load).holds)
    assert (plans["balanced"].holds != plans["even"].holds).any()  # EPLB's pairs of ranks were joined
