"""One decode step as a Chrome trace (chrome://tracing, Perfetto): per die, per link class, per phase.

Phases run one after another (simulate.py), so each starts where the last ended. Three processes:
- ``phases``: one track, every phase of every layer (dense layers as one block each);
- ``dies``: one track per die; compute phases last as long as that die's own work (the experts
  phase is each die's roofline, so a die that finishes early shows idle time before the combine);
  communication phases span the whole phase on every die;
- ``link classes``: one track per kind of link (mesh, wafer-up, nvlink-up, inject ...): how long
  its busiest link is busy in each communication phase (bytes / bandwidth), its bytes in ``args``.
Times in microseconds, as the format wants.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from meshserve.atomic import write_atomic
from meshserve.wafer.hardware import Hardware
from meshserve.wafer.mapping import Mapping
from meshserve.wafer.models import MoEModel
from meshserve.wafer.simulate import DEFAULT_CONTEXT, LayerResult, dense_layer_s
from meshserve.wafer.topology import topology_for

PHASES, DIES, LINKS = 1, 2, 3  # Chrome trace process ids


def _meta(pid: int, name: str, tid: int | None = None) -> dict:
    if tid is None:
        return {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
    return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}


def _span(name: str, pid: int, tid: int, start_s: float, dur_s: float, args: dict | None = None) -> dict:
    out = {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": start_s * 1e6, "dur": dur_s * 1e6}
    return {**out, "args": args} if args else out


def step_trace(
    hw: Hardware,
    model: MoEModel,
    mapping: Mapping,
    tokens_per_device: float,
    layer: LayerResult,
    context: int = DEFAULT_CONTEXT,
) -> dict:
    """The Chrome trace of one decode step (module docstring) as a JSON-ready dict."""
    topo = topology_for(hw)
    n = topo.num_devices
    kinds = list(dict.fromkeys(topo.link_kind.tolist()))
    kind_of = np.array([kinds.index(k) for k in topo.link_kind])
    events = [
        _meta(PHASES, "phases"),
        _meta(DIES, "dies"),
        _meta(LINKS, "link classes"),
        _meta(PHASES, "step", 0),
    ]
    events += [_meta(DIES, f"die {d}", d) for d in range(n)]
    events += [_meta(LINKS, k, i) for i, k in enumerate(kinds)]
    dense = dense_layer_s(hw, model, mapping, layer, tokens_per_device, context)
    t = 0.0
    for i in range(model.first_dense_layers):
        events.append(_span(f"dense layer {i}", PHASES, 0, t, dense))
        events += [_span(f"dense layer {i}", DIES, d, t, dense) for d in range(n)]
        t += dense
    for i in range(model.first_dense_layers, model.num_layers):
        for p in layer.phases:
            args = {"layer": i}
            events.append(_span(p.name, PHASES, 0, t, p.time_s, args))
            if p.name == "experts":  # each die's own roofline time
                events += [_span(p.name, DIES, d, t, float(layer.expert_s[d]), args) for d in range(n)]
            else:
                events += [_span(p.name, DIES, d, t, p.time_s, args) for d in range(n)]
            if p.model != "roofline":
                seconds = p.loads / topo.link_bandwidth
                busy = np.zeros(len(kinds))
                np.maximum.at(busy, kind_of, seconds)
                total = np.bincount(kind_of, p.loads, len(kinds))
                events += [
                    _span(p.name, LINKS, int(k), t, float(busy[k]), {**args, "bytes": float(total[k])})
                    for k in np.flatnonzero(total > 0)
                ]
            t += p.time_s
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"step_s": t, "devices": n}}


def write_trace(trace: dict, path: str | os.PathLike[str]) -> Path:
    """The trace as one JSON file (written atomically)."""
    return write_atomic(path, json.dumps(trace).encode())
