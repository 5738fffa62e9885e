"""benchmarks/peers/vllm_race.py: every round of the real-size race draws prompts no other round drew."""

import argparse
import importlib.util
from pathlib import Path

RACE = Path(__file__).parents[2] / "benchmarks" / "peers" / "vllm_race.py"


def load_race():
    spec = importlib.util.spec_from_file_location("vllm_race", RACE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warm_up_rounds_never_draw_a_timed_round_s_prompts():
    race = load_race()
    for rounds in (1, 2, 3):
        args = argparse.Namespace(rounds=rounds, seed=0, vocab=32000)
        timed = [race.workload("prompt", args, r)[0] for r in range(rounds)]
        warm = [race.workload("prompt", args, race.warmup_round(args, w))[0] for w in range(2)]
        drawn = [tuple(map(tuple, p)) for p in timed + warm]
        assert len(set(drawn)) == len(drawn)  # a repeat lets prefix caches skip a timed round's prompts
