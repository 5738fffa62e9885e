"""Data-parallel attention x expert-parallel MoE over torch.distributed, with live expert migration.

    LLM(model, data_parallel_size=4, enable_expert_parallel=True, enable_eplb=True,
        eplb_config={"num_redundant_experts": 2, "balancer": "greedy", "mode": "non-invasive"})

frontend.py starts the ranks and deals requests (processes.py: spawned here, one pipe each; torchrun.py:
started by torchrun, commands over torch.distributed); worker.py is one rank (an ordinary Engine);
models/layers/moe_ep.py does the all-to-all dispatch and combine; expert_map.py turns a placement
into lookup tables; eplb.py plans from the ranks' expert loads and migrates experts live.
"""

from meshserve.engine.distributed.config import EPLBConfig, ParallelConfig
from meshserve.engine.distributed.frontend import DistributedEngine
from meshserve.engine.distributed.ranks import RankError

__all__ = ["DistributedEngine", "EPLBConfig", "ParallelConfig", "RankError"]
