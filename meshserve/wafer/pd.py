"""Prefill/decode deployment on one platform: mixed (every die does both) or disaggregated.

mixed (what `simulate` models, plus the prompts): each step packs a die's B decode tokens with
the prompt tokens that keep requests flowing in steady state (B * P / O per die: a request brings
P prompt tokens per O output tokens; B falls to what the budget below sustains), so every decode
token waits for prompt work (TPOT). A new prompt runs in the steps after it arrives, in
ceil(P / (budget * TP)) chunks of at most presets/pd.yaml's prefill budget per die, each on top
of the dies' decode tokens (TTFT).

disagg: the first ``prefill_dies`` dies (whole mesh rows, or GPUs of the one switch node) run
prefill iterations of whole prompts (as few per TP group as keep up with the decode side, at most
presets/pd.yaml's budget per die); the rest decode B tokens per die. Each side is simulated as a
platform of its own: an XY route between two dies of a block of rows never leaves the block, so
its collectives are the full mesh's. Each request's KV cache then moves from its prefill TP group
to a decode TP group, member j to member j, on the full platform's routes; requests spread
evenly over all (prefill group, decode group) pairs.

Shared links: a KV flow runs along its source row, then down its destination column, over links
that both sides' collectives use. Each link is a processor-sharing server: the collectives get
its bandwidth less the KV stream's mean share (so they slow down), and a KV flow gets what the
collectives and the other KV flows leave (M/G/1-PS mean sojourn: size / (bandwidth x (1 - load)));
the request rate is the fixed point of that slowdown, and the KV stream may load no link past
pd.yaml's link_ceiling. docs/wafer.md ("Disaggregated prefill and decode") says what this leaves out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from meshserve.errors import InputError, integer, number
from meshserve.wafer.capacity import Fit, die_memory
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import MoEModel
from meshserve.wafer.presets import PRESET_DIR, Section, read_yaml
from meshserve.wafer.simulate import LayerResult, simulate_layer, step_s
from meshserve.wafer.split import split_platform, splits
from meshserve.wafer.timemodel import bottleneck_s
from meshserve.wafer.topology import Topology, topology_for

DEPLOYS = ("mixed", "disagg")
PD_PATH = PRESET_DIR / "pd.yaml"


@dataclass(frozen=True)
class Mix:
    """A request mix: mean prompt and output lengths in tokens."""

    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        integer(self.prompt_tokens, "prompt_tokens", 1)
        integer(self.output_tokens, "output_tokens", 1)

    @property
    def context(self) -> int:
        """Mean context a decode token attends to over a request's life."""
        return self.prompt_tokens + self.output_tokens // 2

    @property
    def label(self) -> str:
        return f"{self.prompt_tokens}/{self.output_tokens}"


@dataclass(frozen=True)
class PDSettings:
    """presets/pd.yaml: the prefill budget, the KV stream's link ceiling, the --plot sweep."""

    prefill_tokens_per_device: float
    link_ceiling: float
    mixes: tuple[Mix, ...]
    compare_on: tuple[str, ...]


@cache
def pd_settings() -> PDSettings:
    """presets/pd.yaml, validated like every preset (unknown keys refused)."""
    s = Section(read_yaml(PD_PATH, "pd"), "pd")
    ceiling = s.number("link_ceiling")
    if ceiling >= 1:
        raise InputError("pd.link_ceiling", f"must be < 1 (a link's utilisation), got {ceiling}")
    mixes = s.data.get("mixes") if s.has("mixes") else None
    if not isinstance(mixes, list) or not mixes or any(not isinstance(m, list) or len(m) != 2 for m in mixes):
        raise InputError(
            "pd.mixes", f"must be a non-empty list of [prompt, output] token pairs, got {mixes!r}"
        )
    others = s.data.get("compare_on", []) if s.has("compare_on") else []
    if not isinstance(others, list) or not all(isinstance(o, str) for o in others):
        raise InputError("pd.compare_on", f"must be a list of hardware preset names, got {others!r}")
    out = PDSettings(
        s.number("prefill_tokens_per_device"), ceiling, tuple(Mix(*m) for m in mixes), tuple(others)
    )
    s.reject_unknown()
    return out


def kv_bytes_per_request(model: MoEModel, prompt_tokens: int) -> float:
    """One copy of a prompt's KV cache, every layer (GQA: K and V heads; MLA: the latent + rope key)."""
    return float(model.num_layers * model.kv_bytes_per_token * prompt_tokens)


def kv_member_bytes(model: MoEModel, prompt_tokens: int, tp: int) -> float:
    """What one TP member holds of it, and so sends to its counterpart (model.kv_shards)."""
    return kv_bytes_per_request(model, prompt_tokens) / model.kv_shards(tp)


def kv_transfer_s(
    topo: Topology, src: np.ndarray, dst: np.ndarray, nbytes: float, free: np.ndarray | None = None
) -> np.ndarray:
    """Seconds for flows src[i] -> dst[i] of ``nbytes`` each: over the narrowest free bandwidth on
    the route (``free`` [links] bytes/s, default the links' own) plus the route's latency."""
    free = topo.link_bandwidth if free is None else free
    src, dst = np.asarray(src), np.asarray(dst)
    routes = topo.incidence[src * topo.num_devices + dst]
    per_byte = routes.multiply(1.0 / np.maximum(free, 1e-300)).max(axis=1).toarray().ravel()
    return nbytes * per_byte + topo.path_latency[src, dst]


def kv_flows(prefill_groups: np.ndarray, decode_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) of every KV flow, for every (prefill group, decode group) pair in that order:
    member j of the prefill group sends to member j of the decode group."""
    shape = (len(prefill_groups), len(decode_groups), prefill_groups.shape[1])
    src = np.broadcast_to(prefill_groups[:, None, :], shape)
    return src.reshape(-1), np.broadcast_to(decode_groups[None, :, :], shape).reshape(-1)


def step_link_bytes(model: MoEModel, layer: LayerResult) -> np.ndarray:
    """[links] bytes a step puts on each link: every phase of each MoE layer (compute phases carry
    none), the attention reduction twice in each dense layer."""
    return model.num_moe_layers * sum(p.loads for p in layer.phases) + (
        2 * model.first_dense_layers * layer.attention_loads
    )


def slowed(layer: LayerResult, bandwidth: np.ndarray, share: np.ndarray) -> LayerResult:
    """The layer with its collectives on links whose ``share`` [links] another stream holds: the
    bottleneck time on what is left (a fair-share phase is scaled by the same ratio)."""
    free = bandwidth * (1.0 - share)
    phases = []
    for p in layer.phases:
        if p.model != "roofline" and p.bandwidth_s > 0:
            scale = float(bottleneck_s(p.loads, free) / bottleneck_s(p.loads, bandwidth))
            p = dataclasses.replace(
                p, time_s=p.latency_s + p.bandwidth_s * scale, bandwidth_s=p.bandwidth_s * scale
            )
        phases.append(p)
    return dataclasses.replace(layer, phases=phases)


@dataclass(frozen=True)
class PDPoint:
    """One deployment at one mix, per iteration and in steady state (seconds, bytes, per second).

    prefill_step_s: a prefill iteration (disagg) or a mixed step; decode_step_s: a decode step.
    bound: what caps the request rate (prefill, decode or kv-links; mixed: steps).
    kv_transfer_s: a request's KV move, mean over (prefill group, decode group) pairs, under load.
    link_utilization: the busiest link's share of time, all traffic; kv_link_utilization: KV's
    share of the link it loads most. decode_only_step_s: a step with no prompt work (`simulate`'s).
    tpot_slo_s: the TPOT limit the decode batch (tokens_per_device) was chosen for, if any.
    """

    deploy: str
    hardware: str
    model: str
    mix: Mix
    tp: int
    tokens_per_device: float
    prefill_dies: int
    decode_dies: int
    ttft_s: float
    tpot_s: float
    prefill_step_s: float
    decode_step_s: float
    decode_only_step_s: float
    requests_per_s: float
    output_tokens_per_s_per_die: float
    bound: str
    kv_bytes_per_request: float
    kv_wire_bytes_per_request: float
    kv_transfer_s: float
    kv_transfer_worst_s: float
    kv_link_utilization: float
    link_utilization: float
    fits: bool
    memory: str
    tpot_slo_s: float | None = None

    @property
    def meets_slo(self) -> bool:
        return self.tpot_slo_s is None or self.tpot_s <= self.tpot_slo_s

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(
            prompt_tokens=self.mix.prompt_tokens,
            output_tokens=self.mix.output_tokens,
            meets_slo=self.meets_slo,
        )
        del out["mix"]
        return out


def _slots(model: MoEModel, dies: int) -> int:
    return -(-model.routed_experts // dies)


def _tightest(*fits: Fit) -> Fit:
    return max(fits, key=lambda f: f.need / f.capacity)


def mixed(
    hw: Hardware, model: MoEModel, mix: Mix, tp: int, mapping: str, tokens: float, time_model: str
) -> PDPoint:
    """Every die decodes ``tokens`` tokens per step and runs the prompt tokens that keep pace:
    B * P / O per die, at most presets/pd.yaml's prefill budget (when the mix needs more, the
    decode batch falls to what the budget sustains)."""
    budget = pd_settings().prefill_tokens_per_device
    m = make_mapping(hw, tp, mapping)
    tokens = min(tokens, budget * mix.output_tokens / mix.prompt_tokens)

    def run(prompt: float) -> tuple[LayerResult, float]:
        """A step of the decode batch plus ``prompt`` prompt tokens per die: the layer, the step's seconds."""
        layer = simulate_layer(
            hw,
            model,
            m,
            tokens + prompt,
            context=mix.context,
            time_model=time_model,
            prefill_tokens_per_device=prompt,
            prompt=mix.prompt_tokens,
        )
        return layer, step_s(hw, model, m, layer, tokens + prompt, mix.context)

    layer, step = run(tokens * mix.prompt_tokens / mix.output_tokens)
    # a new prompt's chunks each wait a step, no shorter than the steady mean one
    chunks = math.ceil(mix.prompt_tokens / (budget * tp))
    ttft = chunks * max(step, run(mix.prompt_tokens / tp / chunks)[1])
    alone = simulate_layer(hw, model, m, tokens, context=mix.context, time_model=time_model)
    topo = topology_for(hw)
    fit = die_memory(
        model, hw, tp, _slots(model, hw.num_devices), tokens, mix.prompt_tokens + mix.output_tokens
    )
    n = hw.num_devices
    return PDPoint(
        deploy="mixed",
        hardware=hw.name,
        model=model.name,
        mix=mix,
        tp=tp,
        tokens_per_device=tokens,
        prefill_dies=n,
        decode_dies=n,
        ttft_s=ttft,
        tpot_s=step,
        prefill_step_s=step,
        decode_step_s=step,
        decode_only_step_s=step_s(hw, model, m, alone, tokens, mix.context),
        requests_per_s=n * tokens / (step * mix.output_tokens),
        output_tokens_per_s_per_die=tokens / step,
        bound="steps",
        kv_bytes_per_request=kv_bytes_per_request(model, mix.prompt_tokens),
        kv_wire_bytes_per_request=0.0,
        kv_transfer_s=0.0,
        kv_transfer_worst_s=0.0,
        kv_link_utilization=0.0,
        link_utilization=float((step_link_bytes(model, layer) / topo.link_bandwidth).max() / step),
        fits=fit.fits,
        memory=fit.describe(),
    )


def disagg(
    hw: Hardware,
    model: MoEModel,
    mix: Mix,
    tp: int,
    mapping: str,
    tokens: float,
    time_model: str,
    prefill_dies: int,
    settings: PDSettings | None = None,
) -> PDPoint:
    """``prefill_dies`` dies prefill, the rest decode ``tokens`` tokens per die; KV moves between them."""
    settings = settings or pd_settings()
    pre, dec = split_platform(hw, prefill_dies, tp, mapping)
    p_len, o_len = mix.prompt_tokens, mix.output_tokens
    g_pre, g_dec = pre.devices[pre.mapping.groups], dec.devices[dec.mapping.groups]  # [groups, tp] full ids
    decode = simulate_layer(dec.hw, model, dec.mapping, tokens, context=mix.context, time_model=time_model)
    decode_rate = (
        dec.devices.size * tokens / (step_s(dec.hw, model, dec.mapping, decode, tokens, mix.context) * o_len)
    )

    @cache
    def prefill(prompts: int) -> tuple[LayerResult, float]:
        """A prefill iteration of ``prompts`` prompts per TP group: the layer and its request rate."""
        n_tokens = prompts * p_len / tp
        layer = simulate_layer(
            pre.hw,
            model,
            pre.mapping,
            n_tokens,
            context=0,
            time_model=time_model,
            prefill_tokens_per_device=n_tokens,
            prompt=p_len,
        )
        return layer, len(g_pre) * prompts / step_s(pre.hw, model, pre.mapping, layer, n_tokens, 0)

    # the fewest prompts per iteration that keep up with the decode side (each waits for its whole
    # iteration: fewer is a shorter TTFT), at most the budget's worth
    lo, hi = 1, max(1, math.floor(settings.prefill_tokens_per_device * tp / p_len))
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if prefill(mid)[1] >= decode_rate else (mid + 1, hi)
    prompts, p_tokens = lo, lo * p_len / tp
    layers = {"prefill": prefill(prompts)[0], "decode": decode}
    sides = {"prefill": (pre, p_tokens), "decode": (dec, tokens)}
    topo = topology_for(hw)
    bw = topo.link_bandwidth
    member = kv_member_bytes(model, p_len, tp)
    src, dst = kv_flows(g_pre, g_dec)
    traffic = np.zeros((hw.num_devices, hw.num_devices))
    np.add.at(traffic, (src, dst), member / (len(g_pre) * len(g_dec)))  # one request, spread evenly
    kv_per_rate = topo.link_loads(traffic) / bw  # a link's KV utilisation per request/s

    def run(rate: float) -> tuple[dict[str, float], np.ndarray]:
        """Step times with the KV stream at ``rate`` requests/s on the links; the collectives' link use."""
        share, steps, busy = rate * kv_per_rate, {}, np.zeros(topo.num_links)
        for name, (side, n_tokens) in sides.items():
            layer = slowed(layers[name], bw[side.links], share[side.links])
            context = mix.context if name == "decode" else 0
            steps[name] = step_s(side.hw, model, side.mapping, layer, n_tokens, context)
            busy[side.links] += step_link_bytes(model, layers[name]) / bw[side.links] / steps[name]
        return steps, busy

    def capacity(steps: dict[str, float]) -> dict[str, float]:
        return {
            "prefill": len(g_pre) * prompts / steps["prefill"],
            "decode": dec.devices.size * tokens / (steps["decode"] * o_len),
        }

    steps, busy = run(0.0)  # the KV stream's headroom: the collectives at their fastest, busiest
    used = kv_per_rate > 0
    kv_cap = float(((settings.link_ceiling - busy[used]).clip(min=0) / kv_per_rate[used]).min(initial=np.inf))
    lo, hi = 0.0, min(*capacity(steps).values(), kv_cap)
    for _ in range(60):  # the rate the slowed sides sustain: f(rate) = rate, f falls as rate grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if min(*capacity(run(mid)[0]).values(), kv_cap) >= mid else (lo, mid)
    rate = lo
    steps, busy = run(rate)
    caps = {**capacity(steps), "kv-links": kv_cap}
    share = rate * kv_per_rate
    flows = kv_transfer_s(topo, src, dst, member, bw * (1 - busy - share))
    pair = flows.reshape(len(g_pre), len(g_dec), tp).max(axis=2)
    n = hw.num_devices
    fit = _tightest(
        die_memory(model, pre.hw, tp, _slots(model, pre.devices.size), prompts / tp, p_len),
        die_memory(model, dec.hw, tp, _slots(model, dec.devices.size), tokens, p_len + o_len),
    )
    return PDPoint(
        deploy="disagg",
        hardware=hw.name,
        model=model.name,
        mix=mix,
        tp=tp,
        tokens_per_device=tokens,
        prefill_dies=prefill_dies,
        decode_dies=n - prefill_dies,
        ttft_s=steps["prefill"],
        tpot_s=steps["decode"],
        prefill_step_s=steps["prefill"],
        decode_step_s=steps["decode"],
        decode_only_step_s=steps["decode"],
        requests_per_s=rate,
        output_tokens_per_s_per_die=rate * o_len / n,
        bound=min(caps, key=caps.get),
        kv_bytes_per_request=kv_bytes_per_request(model, p_len),
        kv_wire_bytes_per_request=member * tp,
        kv_transfer_s=float(pair.mean()),
        kv_transfer_worst_s=float(pair.max()),
        kv_link_utilization=float(share.max()),
        link_utilization=float((busy + share).max()),
        fits=fit.fits,
        memory=fit.describe(),
    )


def largest_batch(at: Callable[[float], PDPoint], most: float, tpot_slo_s: float) -> PDPoint:
    """The point ``at(batch)`` with the largest decode batch per die in [1, most] whose TPOT meets
    the limit and whose dies' HBM holds it (bisection: both get worse as the batch grows); the
    batch-1 point when none does."""

    def ok(batch: float) -> bool:
        point = at(batch)
        return point.tpot_s <= tpot_slo_s and point.fits

    lo, hi = 1.0, float(most)
    if ok(hi):
        lo = hi
    for _ in range(16 if lo < hi else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return dataclasses.replace(at(lo), tpot_slo_s=tpot_slo_s)


def deployment(
    hw: Hardware,
    model: MoEModel,
    mix: Mix,
    *,
    deploy: str = "mixed",
    prefill_dies: int | None = None,
    tp: int = 4,
    mapping: str = "er",
    tokens_per_device: float = 64,
    time_model: str = "bottleneck",
    tpot_slo_s: float | None = None,
) -> PDPoint:
    """One deployment at one mix. disagg without ``prefill_dies`` takes the split with the highest
    output throughput among those that fit the dies' memory (among all when none fits).
    tpot_slo_s: decode the largest batch per die, up to ``tokens_per_device``, whose TPOT meets it
    and that fits the dies' HBM."""
    if deploy not in DEPLOYS:
        raise InputError("deploy", f"unknown {deploy!r}; allowed: {', '.join(DEPLOYS)}")
    if tpot_slo_s is not None:
        number(tpot_slo_s, "tpot_slo_s", 0, low_open=True)
    if tokens_per_device < 1:
        raise InputError("tokens_per_device", f"must be >= 1 decode token per die, got {tokens_per_device}")

    def best(at: Callable[[float], PDPoint]) -> PDPoint:
        return (
            at(tokens_per_device) if tpot_slo_s is None else largest_batch(at, tokens_per_device, tpot_slo_s)
        )

    if deploy == "mixed":
        if prefill_dies is not None:
            raise InputError("prefill_dies", "is for deploy=disagg; a mixed deployment prefills on every die")
        return best(lambda b: mixed(hw, model, mix, tp, mapping, b, time_model))
    options = splits(hw, tp) if prefill_dies is None else [prefill_dies]
    if not options:
        split_platform(hw, 0, tp, mapping)  # raises, naming what is allowed
    points = [best(lambda b, d=d: disagg(hw, model, mix, tp, mapping, b, time_model, d)) for d in options]
    return max(points, key=lambda p: (p.fits, p.meets_slo, p.output_tokens_per_s_per_die))
