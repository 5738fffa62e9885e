"""Where attention TP groups, Full Token Domains (FTDs) and experts sit on the devices.

A mapping holds every TP group's ring (device order) and every device's FTD. An FTD is a set of
devices holding one member of every TP group: after the attention all-reduce all members of a
group hold the group's tokens, so the all-to-all for experts on device x is sourced only from x's
FTD (the token of group g goes out from g's member in x's FTD).

Mesh mappings (built per wafer, repeated on every wafer):
- baseline: each TP group is a compact block (2x2 for TP=4) with a 1-hop ring; FTD j = the j-th
  ring member of every group, so FTDs are spread over the wafer and cross in its centre.
- er (ER-Mapping, the paper's construction): the wafer is cut into TP compact blocks; each block
  holds one die of every group (FTD = block); group o = the die at offset o of every block, its ring
  visiting the blocks in a cycle, all rings in the same direction.
- er-bal (our variant): same blocks and FTDs, but groups on a checkerboard of offsets run their
  ring in the opposite direction, so the rings' crossings of each block boundary are spread over
  all rows/columns instead of half of them (halves the hottest all-reduce link).
- her / her-bal (hierarchical, multi-wafer): the er / er-bal layout on every wafer; the simulator
  then runs an intra-wafer reduce-scatter, an inter-wafer all-gather between dies at the same
  position, and keeps the all-to-all inside each wafer (see traffic.py).
- her-ftd (hierarchical, the paper notes' reading): the er layout; a full all-reduce in each TP
  group, an inter-wafer all-gather of the full tokens, then the all-to-all inside each wafer's FTDs.
Which collectives reduce the attention output and which devices share an all-to-all are data
(presets/mappings.yaml), so a new reading is a new entry there.
Switch platforms use the same constructions on a nodes x GPUs-per-node grid (baseline: a group
inside a node; er: an FTD = whole nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from meshserve.errors import InputError
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.presets import PRESET_DIR, Section, read_yaml

LAYOUTS = ("compact", "entwined", "entwined-balanced")
OPS = ("all-reduce", "reduce-scatter", "all-gather")
RING_OVER = ("tp-group", "wafers")
DOMAIN_KEYS = ("ftd", "wafer")


@dataclass(frozen=True)
class Reading:
    """One mapping reading (presets/mappings.yaml): layout, attention collectives, all-to-all domain."""

    layout: str
    attention: tuple[tuple[str, str], ...]  # (op, over) in order
    a2a_domain: tuple[str, ...]

    @property
    def hierarchical(self) -> bool:
        """True when a collective runs across wafers (needs several wafers or nodes)."""
        return any(over == "wafers" for _, over in self.attention)


@lru_cache(maxsize=1)
def readings() -> dict[str, Reading]:
    """Every mapping reading by name, validated (InputError names the bad field)."""
    data = read_yaml(PRESET_DIR / "mappings.yaml", "mapping")
    out = {}
    for name, entry in Section(data, "mappings").data.items():
        sec = Section(entry, f"mappings.{name}")
        steps = sec.data.get("attention") if sec.has("attention") else None
        if not isinstance(steps, list) or not steps:
            raise InputError(f"mappings.{name}.attention", "must be a non-empty list of {op, over}")
        sections = [Section(step, f"mappings.{name}.attention") for step in steps]
        attention = tuple((step.choice("op", OPS), step.choice("over", RING_OVER)) for step in sections)
        domain = sec.data.get("a2a_domain") if sec.has("a2a_domain") else None
        if not isinstance(domain, list) or not domain or any(k not in DOMAIN_KEYS for k in domain):
            raise InputError(
                f"mappings.{name}.a2a_domain",
                f"must be a non-empty list of {', '.join(DOMAIN_KEYS)}, got {domain!r}",
            )
        out[name] = Reading(sec.choice("layout", LAYOUTS), attention, tuple(domain))
        for part in (sec, *sections):  # strict, as every preset: a misspelt key is an error
            part.reject_unknown()
    return out


MAPPINGS = tuple(readings())


@dataclass(frozen=True, eq=False)
class Mapping:
    """TP rings, FTDs and wafers of one layout, and the reading's collectives.

    groups[g]: device ids of TP group g in ring order (shape [G, TP]).
    ftd_of[d]: FTD index (0..TP-1) of device d; each group has exactly one member per FTD.
    wafer_of[d]: wafer (or node, on switch platforms) of device d.
    reading: its collectives (attention reduction, all-to-all domain), from presets/mappings.yaml.
    """

    name: str
    tp: int
    groups: np.ndarray
    ftd_of: np.ndarray
    wafer_of: np.ndarray
    reading: Reading

    def __post_init__(self) -> None:
        counts = np.zeros((self.num_groups, self.tp), dtype=np.int64)
        np.add.at(counts, (self.group_of, self.ftd_of), 1)
        if not (counts == 1).all():
            raise ValueError("every TP group must have exactly one member in every FTD")

    @property
    def num_devices(self) -> int:
        return self.groups.size

    @property
    def hierarchical(self) -> bool:
        return self.reading.hierarchical

    @cached_property
    def domain_of(self) -> np.ndarray:
        """[N] all-to-all domain id: devices exchange tokens only with devices of the same id."""
        keys = {"ftd": (self.ftd_of, self.tp), "wafer": (self.wafer_of, self.num_wafers)}
        out = np.zeros(self.num_devices, dtype=np.int64)
        for key in self.reading.a2a_domain:
            values, count = keys[key]
            out = out * count + values
        return out

    def ring_members(self, over: str) -> np.ndarray:
        """[rings, members]: the TP groups, or the dies at one position on every wafer."""
        return self.groups if over == "tp-group" else self.counterparts()

    @property
    def held_tokens_factor(self) -> float:
        """Tokens a die holds after the attention collectives, per token of its TP group."""
        factor = 1.0
        for op, over in self.reading.attention:
            p = self.ring_members(over).shape[1]
            factor *= {"all-reduce": 1.0, "reduce-scatter": 1.0 / p, "all-gather": float(p)}[op]
        return factor

    @property
    def num_groups(self) -> int:
        """Number of TP groups (= data-parallel degree DP = FTD size)."""
        return self.groups.shape[0]

    @property
    def num_wafers(self) -> int:
        return int(self.wafer_of.max()) + 1

    @cached_property
    def group_of(self) -> np.ndarray:
        """[N] TP group of each device."""
        out = np.empty(self.num_devices, dtype=np.int64)
        out[self.groups.ravel()] = np.repeat(np.arange(self.num_groups), self.tp)
        return out

    @cached_property
    def sender(self) -> np.ndarray:
        """[G, TP] device of group g inside FTD f: it sends g's tokens to experts in FTD f."""
        out = np.empty((self.num_groups, self.tp), dtype=np.int64)
        out[self.group_of, self.ftd_of] = np.arange(self.num_devices)
        return out

    @property
    def ftds(self) -> np.ndarray:
        """[TP, G] devices of each FTD (one member of every group, by group id)."""
        return self.sender.T

    def counterparts(self) -> np.ndarray:
        """[devices per wafer, wafers]: the dies at the same position on every wafer (wafer order)."""
        per = self.num_devices // self.num_wafers
        return np.arange(per)[:, None] + per * np.arange(self.num_wafers)[None, :]


def cycle(rows: int, cols: int) -> np.ndarray:
    """Cells (row-major ids) of a rows x cols grid in ring order.

    When a cycle of 1-step moves exists (one side even, both >= 2) it is returned: along row 0,
    snaking back through the other rows, up column 0. Otherwise the rows are visited boustrophedon
    and the ring's closing step is longer.
    """
    grid = np.arange(rows * cols).reshape(rows, cols)
    if rows >= 2 and cols >= 2 and rows % 2 == 0:
        path = [grid[0]] + [grid[r, 1:][::-1] if r % 2 else grid[r, 1:] for r in range(1, rows)]
        return np.concatenate(path + [grid[1:, 0][::-1]])
    if rows >= 2 and cols >= 2 and cols % 2 == 0:
        r, c = np.divmod(cycle(cols, rows), rows)  # cells of the transposed grid
        return c * cols + r
    return np.concatenate([grid[r, ::-1] if r % 2 else grid[r] for r in range(rows)])


def block_shape(rows: int, cols: int, k: int) -> tuple[int, int] | None:
    """The most square (h, w) with h * w = k tiling a rows x cols grid (wider first), or None."""
    shapes = [(h, k // h) for h in range(1, k + 1) if k % h == 0 and rows % h == 0 and cols % (k // h) == 0]
    return min(shapes, key=lambda s: (abs(np.log(s[0] / s[1])), s[0]), default=None)


def _baseline(rows: int, cols: int, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group a compact bh x bw block with a snake ring; FTD j = ring member j of every group."""
    bh, bw = block_shape(rows, cols, tp)
    off_r, off_c = np.divmod(cycle(bh, bw), bw)
    base_r, base_c = np.divmod(np.arange(rows * cols // tp), cols // bw)
    groups = (base_r[:, None] * bh + off_r) * cols + base_c[:, None] * bw + off_c
    ftd_of = np.empty(rows * cols, dtype=np.int64)
    ftd_of[groups] = np.arange(tp)
    return groups, ftd_of


def _entwined(rows: int, cols: int, tp: int, balanced: bool) -> tuple[np.ndarray, np.ndarray]:
    """TP compact blocks (the FTDs); group o = the die at offset o of every block, ring over blocks."""
    a, b = block_shape(rows, cols, tp)
    bh, bw = rows // a, cols // b
    blk_r, blk_c = np.divmod(cycle(a, b), b)
    off_r, off_c = np.divmod(np.arange(bh * bw), bw)
    groups = (blk_r * bh + off_r[:, None]) * cols + blk_c * bw + off_c[:, None]
    if balanced and tp > 2:
        # checkerboard of offsets runs its ring backwards: crossings spread over all rows/columns
        back = (off_r + off_c) % 2 == 1
        groups[back] = groups[back][:, np.r_[0, tp - 1 : 0 : -1]]
    r, c = np.divmod(np.arange(rows * cols), cols)
    return groups, (r // bh) * b + c // bw


def make_mapping(hw: Hardware, tp: int, kind: str = "baseline") -> Mapping:
    """Build a mapping of TP groups on a platform. kind: one of MAPPINGS."""
    if kind not in MAPPINGS:
        raise InputError("mapping", f"unknown mapping {kind!r}; allowed: {', '.join(MAPPINGS)}")
    if hw.kind == "mesh":
        rows, cols, wafers = hw.rows, hw.cols, hw.wafers
    else:  # a node behaves as a wafer: 1 x GPUs-per-node
        rows, cols, wafers = 1, hw.devices_per_node, hw.devices // hw.devices_per_node
    per = rows * cols
    if not isinstance(tp, int | np.integer) or tp < 1 or block_shape(rows, cols, tp) is None:
        fits = [t for t in range(1, per + 1) if block_shape(rows, cols, t) and t & (t - 1) == 0]
        where = f"{rows}x{cols} mesh" if hw.kind == "mesh" else f"{cols}-GPU node"
        raise InputError(
            "tp", f"{tp} does not tile the {where} of {hw.name}; allowed: {', '.join(map(str, fits))}"
        )
    reading = readings()[kind]
    if reading.hierarchical and wafers < 2:
        flat = ", ".join(k for k, r in readings().items() if not r.hierarchical)
        raise InputError(
            "mapping", f"{kind} needs several wafers/nodes; {hw.name} has one; allowed here: {flat}"
        )
    if reading.layout == "compact":
        groups, ftd_of = _baseline(rows, cols, tp)
    else:
        groups, ftd_of = _entwined(rows, cols, tp, balanced=reading.layout == "entwined-balanced")
    offsets = (np.arange(wafers) * per)[:, None, None]
    return Mapping(
        name=kind,
        tp=tp,
        groups=(groups[None] + offsets).reshape(-1, tp),
        ftd_of=np.tile(ftd_of, wafers),
        wafer_of=np.repeat(np.arange(wafers), per),
        reading=reading,
    )


def expert_placement(num_experts: int, num_devices: int, ep: int | None = None) -> np.ndarray:
    """Default placement [experts, devices]: fraction of each expert's tokens each device serves.

    ep devices (0..ep-1) hold the experts round-robin (several per device when experts > ep; when
    experts < ep, each expert is replicated on ep // experts devices); the set is repeated
    num_devices // ep times. Replicas split an expert's load evenly, so rows sum to 1.
    """
    ep = num_devices if ep is None else ep
    if not 1 <= ep <= num_devices or num_devices % ep:
        divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
        raise InputError(
            "ep",
            f"must divide the {num_devices} devices (so at most {num_devices}), got {ep}; "
            f"allowed: {', '.join(map(str, divisors))}",
        )
    slots = np.arange(max(num_experts, ep))
    hosts = np.zeros((num_experts, ep))
    hosts[slots % num_experts, slots % ep] = 1.0
    placement = np.tile(hosts, (1, num_devices // ep))
    return placement / placement.sum(axis=1, keepdims=True)
