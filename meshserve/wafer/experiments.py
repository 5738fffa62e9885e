"""`reproduce comm`: baseline vs ER vs hierarchical ER communication, and the digest's open question.

Everything here is a sweep over simulate_layer; the sweep definition and the paper's anchors live
in presets/experiments/comm.yaml.
"""

from __future__ import annotations

import dataclasses
from itertools import product
from typing import Any

import yaml

from meshserve.wafer.hardware import Hardware, load_hardware
from meshserve.wafer.mapping import make_mapping
from meshserve.wafer.models import MoEModel, load_model
from meshserve.wafer.presets import PRESET_DIR
from meshserve.wafer.simulate import RETURN, simulate_layer


def load_spec() -> dict[str, Any]:
    """The comm experiment definition and paper anchors."""
    return yaml.safe_load((PRESET_DIR / "experiments" / "comm.yaml").read_text())


def scale_hardware(entry: dict[str, Any]) -> Hardware:
    """A hardware preset, re-shaped when the entry names rows/cols."""
    hw = load_hardware(entry["hardware"])
    return hw.with_mesh(entry["rows"], entry["cols"]) if "rows" in entry else hw


def comm_point(hw: Hardware, model: MoEModel, tp: int, kind: str, tokens: float, time_model: str) -> dict:
    """Communication of one MoE layer under one mapping, in microseconds and megabytes."""
    layer = simulate_layer(hw, model, make_mapping(hw, tp, kind), tokens, time_model=time_model)
    attention = [
        p
        for p in layer.phases
        if p.model != "roofline" and p.name not in ("dispatch", "combine") and not p.name.startswith(RETURN)
    ]
    return {  # plain floats: the result goes to JSON
        "comm_us": float(layer.comm_s * 1e6),  # attention reduction + all-to-all + output return
        "attention_us": float(layer.attention_comm_s * 1e6),
        "all_to_all_us": float(layer.all_to_all_s * 1e6),
        "return_us": float(layer.return_s * 1e6),
        "attention_hot_mb": float(max(p.hottest_bytes for p in attention) / 1e6),
        "dispatch_hot_mb": float(layer.phase("dispatch").hottest_bytes / 1e6),
    }


def comparison(spec: dict, tokens: float, time_model: str, tick=lambda: None) -> list[dict]:
    """One row per (model, scale): every mapping's point and its reduction against the baseline."""
    rows = []
    for name, entry in product(spec["models"], spec["scales"]):
        hw, model = scale_hardware(entry), load_model(name)
        kinds = spec["flat_mappings"] + (spec["hierarchical_mappings"] if hw.wafers > 1 else [])
        points = {k: comm_point(hw, model, spec["tp"], k, tokens, time_model) for k in kinds}
        base = points["baseline"]
        rows.append(
            {
                "model": name,
                "hardware": hw.name,
                "devices": hw.num_devices,
                "tp": spec["tp"],
                "mappings": points,
                "reduction": {
                    k: 1 - p["comm_us"] / base["comm_us"] for k, p in points.items() if k != "baseline"
                },
                "a2a_reduction": {
                    k: 1 - p["all_to_all_us"] / base["all_to_all_us"]
                    for k, p in points.items()
                    if k != "baseline"
                },
            }
        )
        tick()
    return rows


def open_question(spec: dict, time_model: str, tick=lambda: None) -> dict:
    """Hottest-link growth with mesh size, and the regimes (mesh, TP, top-k, tokens) where ER wins."""
    q = spec["open_question"]
    base_hw, base_model = load_hardware(q["hardware"]), load_model(q["model"])
    growth, regimes = [], []
    for side, tp, top_k, tokens in product(q["mesh_sides"], q["tp"], q["top_k"], q["tokens_per_device"]):
        hw = base_hw.with_mesh(side, side)
        model = dataclasses.replace(base_model, top_k=top_k)
        pts = {k: comm_point(hw, model, tp, k, tokens, time_model) for k in ("baseline", "er", "er-bal")}
        base = pts["baseline"]
        point = {
            "mesh": f"{side}x{side}",
            "tp": tp,
            "top_k": top_k,
            "tokens_per_device": tokens,
            "baseline_us": base["comm_us"],
            **{f"{k}_reduction": 1 - pts[k]["comm_us"] / base["comm_us"] for k in ("er", "er-bal")},
        }
        regimes.append(point)
        if tp == 4 and top_k == base_model.top_k and tokens == 64:
            growth.append(
                {
                    "mesh": point["mesh"],
                    **{
                        f"{k}_allreduce_hot_ratio": pts[k]["attention_hot_mb"] / base["attention_hot_mb"]
                        for k in ("er", "er-bal")
                    },
                    **{
                        f"{k}_dispatch_hot_ratio": pts[k]["dispatch_hot_mb"] / base["dispatch_hot_mb"]
                        for k in ("er", "er-bal")
                    },
                    "er_reduction": point["er_reduction"],
                    "er-bal_reduction": point["er-bal_reduction"],
                }
            )
        tick()
    return {"model": base_model.name, "growth": growth, "regimes": regimes}


def platforms(spec: dict, tokens: float, time_model: str, tick=lambda: None) -> list[dict]:
    """Each model's communication per MoE layer on each platform (baseline mapping)."""
    out = []
    for name in spec["models"]:
        model = load_model(name)
        out.append(
            {
                "model": name,
                **{
                    p: comm_point(load_hardware(p), model, spec["tp"], "baseline", tokens, time_model)[
                        "comm_us"
                    ]
                    for p in spec["platforms"]
                },
            }
        )
        tick()
    return out


def wafer_link_sweep(spec: dict, tokens: float, time_model: str, tick=lambda: None) -> list[dict]:
    """ER and hierarchical ER against the baseline as the inter-wafer port bandwidth varies."""
    s = spec["wafer_link_sweep"]
    base_hw, model = load_hardware(s["hardware"]), load_model(s["model"])
    out = []
    for gb in s["link_bandwidth_gb_per_s"]:
        hw = dataclasses.replace(base_hw, wafer_link_bandwidth=gb * 1e9)
        pts = {
            k: comm_point(hw, model, spec["tp"], k, tokens, time_model)["comm_us"]
            for k in spec["flat_mappings"] + spec["hierarchical_mappings"]
        }
        out.append(
            {
                "wafer_link_gb_per_s": gb,
                "baseline_us": pts["baseline"],
                **{f"{k}_reduction": 1 - v / pts["baseline"] for k, v in pts.items() if k != "baseline"},
            }
        )
        tick()
    return out


def injection_sweep(spec: dict, tokens: float, time_model: str, tick=lambda: None) -> list[dict]:
    """ER against the baseline as each die's injection/ejection port bandwidth varies."""
    s = spec["injection_sweep"]
    base_hw, model = load_hardware(s["hardware"]), load_model(s["model"])
    out = []
    for gb in s["injection_bandwidth_gb_per_s"]:
        hw = base_hw.with_injection(gb * 1e9)
        layers = {
            k: simulate_layer(hw, model, make_mapping(hw, spec["tp"], k), tokens, time_model=time_model)
            for k in ["baseline", *s["mappings"]]
        }
        base = layers["baseline"]
        row = {"injection_gb_per_s": gb, "hardware": hw.name, "baseline_us": base.comm_s * 1e6}
        for k in s["mappings"]:
            layer = layers[k]
            row[f"{k}_reduction"] = 1 - layer.comm_s / base.comm_s
            row[f"{k}_a2a_reduction"] = 1 - layer.all_to_all_s / base.all_to_all_s
            row[f"{k}_dispatch_ratio"] = layer.phase("dispatch").time_s / base.phase("dispatch").time_s
        out.append(row)
        tick()
    return out


def summary(rows: list[dict], question: dict, spec: dict) -> dict:
    """Headline figures beside the paper's anchors (fractions)."""

    def best(kind: str, what: str = "reduction") -> float | None:
        values = [r[what][kind] for r in rows if kind in r[what]]
        return max(values) if values else None

    kinds = spec["flat_mappings"][1:] + spec["hierarchical_mappings"]
    # Total communication (all-to-all + attention reduction) and all-to-all alone: the paper's
    # figures may be either.
    reductions = {f"{k.replace('-', '_')}_reduction_max": best(k) for k in kinds}
    reductions |= {f"{k.replace('-', '_')}_a2a_reduction_max": best(k, "a2a_reduction") for k in kinds}

    anchor = next(r for r in rows if r["hardware"] == "wsc-8x8" and r["model"] == spec["models"][0])
    slowdown = {
        k: anchor["mappings"][k]["attention_us"] / anchor["mappings"]["baseline"]["attention_us"]
        for k in ("er", "er-bal")
    }
    wins = {k: int(sum(p[f"{k}_reduction"] > 0 for p in question["regimes"])) for k in ("er", "er-bal")}
    return {
        **reductions,
        "er_allreduce_slowdown": slowdown["er"],
        "er_bal_allreduce_slowdown": slowdown["er-bal"],
        "regimes_total": len(question["regimes"]),
        "regimes_er_wins": wins["er"],
        "regimes_er_bal_wins": wins["er-bal"],
        "paper": spec["paper"],
    }


def run_comm(tokens: float, time_model: str, progress: bool = True) -> dict:
    """The whole `reproduce comm` computation as one JSON-ready dict."""
    from rich.console import Console
    from rich.progress import Progress

    spec = load_spec()
    q = spec["open_question"]
    total = len(spec["models"]) * len(spec["scales"])
    total += len(q["mesh_sides"]) * len(q["tp"]) * len(q["top_k"]) * len(q["tokens_per_device"])
    total += len(spec["wafer_link_sweep"]["link_bandwidth_gb_per_s"]) + len(spec["models"])
    total += len(spec["injection_sweep"]["injection_bandwidth_gb_per_s"])
    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("simulating", total=total)
        tick = lambda: bar.advance(task)  # noqa: E731
        rows = comparison(spec, tokens, time_model, tick)
        question = open_question(spec, time_model, tick)
        links = wafer_link_sweep(spec, tokens, time_model, tick)
        injection = injection_sweep(spec, tokens, time_model, tick)
        per_platform = platforms(spec, tokens, time_model, tick)
    wsc_vs_dgx = [1 - r["wsc-8x8"] / r["dgx-b200"] for r in per_platform]
    return {
        "wsc_vs_dgx_reduction_avg": sum(wsc_vs_dgx) / len(wsc_vs_dgx),
        "platforms": per_platform,
        "time_model": time_model,
        "tokens_per_device": tokens,
        "tp": spec["tp"],
        **summary(rows, question, spec),
        "rows": rows,
        "open_question": question,
        "wafer_link_sweep": links,
        "injection_sweep": injection,
    }
