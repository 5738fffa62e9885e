"""The costs the iteration model charges beyond the paper's, one named knob each (presets/costs.yaml).

Every default is the realistic value; each knob turned off gives the kinder model back, so a
figure can be shown with and without it (docs/wafer.md, "Costs we charge").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache

from meshserve.errors import require
from meshserve.wafer.presets import PRESET_DIR, Section, read_yaml

COSTS_PATH = PRESET_DIR / "costs.yaml"


@dataclass(frozen=True)
class Costs:
    """output_return: charge the MoE output's way back to every TP member after the combine.
    migration_hbm: charge expert copies' HBM reads and writes on the dies that move them.
    migration_link_ceiling: the highest link utilisation NI-Balancer's streamed copies may fill.
    context_tokens: KV context per sequence in the memory-capacity check.
    check_capacity: mark or refuse points whose weights + replicas + KV exceed a die's HBM.
    """

    output_return: bool
    migration_hbm: bool
    migration_link_ceiling: float
    context_tokens: int
    check_capacity: bool

    def __post_init__(self) -> None:
        c = self.migration_link_ceiling
        require(0 < c <= 1, "migration_link_ceiling", f"must be in (0, 1], got {c}")
        require(self.context_tokens >= 0, "context_tokens", f"must be >= 0, got {self.context_tokens}")

    @classmethod
    def paper(cls) -> Costs:
        """Every cost off: the model as the paper's figures charge it."""
        return cls(False, False, 1.0, default_costs().context_tokens, False)


@cache
def default_costs() -> Costs:
    """The realistic defaults of presets/costs.yaml."""
    s = Section(read_yaml(COSTS_PATH, "costs"), "costs")
    out = Costs(
        output_return=s.boolean("output_return"),
        migration_hbm=s.boolean("migration_hbm"),
        migration_link_ceiling=s.number("migration_link_ceiling"),
        context_tokens=s.integer("context_tokens"),
        check_capacity=s.boolean("check_capacity"),
    )
    s.reject_unknown()
    return out


COST_KNOBS = tuple(f.name for f in fields(Costs))

# the --costs choices: the realistic defaults, or the paper's model (every cost off)
COSTS = {"realistic": default_costs, "paper": Costs.paper}
