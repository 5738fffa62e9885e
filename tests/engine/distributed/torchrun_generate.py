"""Run by test_torchrun.py under ``torchrun --nproc-per-node 2``: every rank runs this file; rank 0 prints
the greedy tokens of PROMPTS (while experts migrate) and the migrations, the other rank serves rank 0
inside ``LLM(...)`` and leaves the process when rank 0 closes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 torchrun_generate.py MODEL_DIR
"""

import json
import sys

from meshserve.engine import LLM
from tests.engine.distributed.helpers import ARGS, tokens

EPLB = {"window_size": 2, "step_interval": 2, "num_redundant_experts": 2, "chunk_bytes": 16384}

with LLM(
    sys.argv[1], data_parallel_size=2, enable_expert_parallel=True, enable_eplb=True, eplb_config=EPLB, **ARGS
) as llm:
    rounds = [tokens(llm) for _ in range(3)]  # a plan every 2 steps: copies in flight, then switches
    migrations = [m for m in llm.engine.migrations if not m.get("error")]
    ranks = type(llm.engine.ranks).__name__
print(json.dumps({"ranks": ranks, "rounds": rounds, "migrations": len(migrations)}))
