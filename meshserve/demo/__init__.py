"""`make run` / `meshserve demo`: the whole system on the shipped tiny models, in a few minutes.

1. Serving: a mixed workload on the trained tiny MoE (DeepSeek-V3 in small) with its draft
   (demo/serving.py): completions, throughput, TTFT/TPOT, prefix-cache hit rate, speculative acceptance;
   the expert-load trace recorded.
2. The bridge: the recorded trace's balance (max/mean expert load, per expert group).
3. Wafer: the trace replayed as recorded on a 2x4 and an 8x8 mesh (demo/replay.py): ER-Mapping and
   NI-Balancer against the baselines; the link heatmaps of DeepSeek-V3 on wsc-8x8.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from meshserve.assets import TINY_DRAFT, TINY_MOE
from meshserve.traces import ExpertTrace
from meshserve.wafer.trace_fit import balancedness  # max/mean load; the fitting is not used here


def _serving_section(console: Console, out: Path, target: Path, draft: Path) -> Path:
    from meshserve.demo.serving import SPECULATIVE_TOKENS, run_serving
    from meshserve.engine.spec.config import DEFAULT_DISABLE_BY_BATCH_SIZE
    from meshserve.models.tokenizer import Tokenizer

    console.rule(
        "1. Serving engine: tiny MoE (DeepSeek-style: MLA, 64 experts top-8 in 8 groups, a shared expert) "
        "+ draft, trained on Python's stdlib"
    )
    r = run_serving(out, target, draft)
    tokenizer = Tokenizer.from_dir(target)
    for prompt, completion in _readable_samples(tokenizer, r.outputs, 3):
        console.print(Text("..." + prompt, style="dim") + Text(completion, style="bold green"))
        console.print(Text("-" * 40, style="dim"))
    table = Table(
        title=f"{len(r.outputs)} requests, greedy, draft-model speculation (k={SPECULATIVE_TOKENS}, "
        f"paused while more than {DEFAULT_DISABLE_BY_BATCH_SIZE} requests run)"
    )
    for col in ("figure", "value"):
        table.add_column(col)
    table.add_row("prompt / output tokens", f"{r.prompt_tokens} / {r.output_tokens}")
    table.add_row("wall time", f"{r.seconds:.1f} s")
    table.add_row("output throughput", f"{r.output_tokens / r.seconds:.1f} tok/s")
    table.add_row("TTFT mean / p90", f"{r.ttft_s.mean() * 1e3:.0f} / {_p90(r.ttft_s) * 1e3:.0f} ms")
    table.add_row("TPOT mean / p90", f"{r.tpot_s.mean() * 1e3:.1f} / {_p90(r.tpot_s) * 1e3:.1f} ms")
    table.add_row("prefix-cache hit rate", f"{r.prefix_hit_rate:.1%}")
    table.add_row(
        "speculative acceptance",
        f"{r.acceptance_rate:.1%} (mean {r.mean_accepted_len:.2f} tokens per verify)",
    )
    console.print(table)
    return r.trace


def _readable_samples(tokenizer, outputs: list, n: int) -> list[tuple[str, str]]:
    """n (prompt tail, completion) pairs, readable code first: ones that read as escapes or binary
    (held-out stdlib files hold bytes literals such as UTF-16 test data) come last, and completions that
    mostly repeat themselves after the other readable ones."""
    pairs = [(tokenizer.decode(o.prompt_token_ids[-40:]), o.text) for o in outputs]

    def readable(text: str) -> bool:
        plain = sum(c.isalpha() or c in " \n_.,:()=" for c in text)
        return "\\x" not in text and "\\u" not in text and plain >= 0.7 * max(len(text), 1)

    def varied(completion: str) -> bool:  # greedy loops ("#\n" or "'S': " fifty times) show little
        grams = [completion[i : i + 8] for i in range(max(len(completion) - 7, 1))]
        return len(set(grams)) >= 0.6 * len(grams)

    ranked = sorted(pairs, key=lambda p: (not readable(p[0] + p[1]), not varied(p[1])))  # stable
    return ranked[:n]


def _p90(values) -> float:
    import numpy as np

    return float(np.percentile(values, 90)) if len(values) else 0.0


def _trace_section(console: Console, trace_path: Path, target: Path) -> None:
    trace = ExpertTrace.load(trace_path)
    b = balancedness(trace.counts)
    console.rule("2. The bridge: the expert-load trace the router recorded")
    console.print(
        f"{trace_path}: {trace.num_steps} steps x {trace.num_layers} MoE layers x "
        f"{trace.num_experts} experts, {int(trace.counts.sum() / trace.top_k)} routed tokens x "
        f"top-{trace.top_k}"
    )
    shares = trace.counts.sum(axis=0) / trace.counts.sum(axis=(0, 2))[:, None]
    groups = _groups(target, trace.num_experts)
    for layer, row in enumerate(shares):
        console.print(
            f"  MoE layer {layer}: hottest expert {row.max():5.1%} (mean {1 / row.size:.1%}), coldest "
            f"{row.min():4.1%}; share per group of {row.size // groups} experts "
            + " ".join(f"{s:5.1%}" for s in row.reshape(groups, -1).sum(axis=1))
        )
    console.print(
        f"max/mean expert load: {b['max_over_mean_total']:.2f} over the whole trace (mean over "
        f"layers; worst layer {b['max_over_mean_total_worst']:.2f}), {b['max_over_mean_per_step']:.2f} "
        "per step (1.00 = perfectly balanced)"
    )


def _groups(target: Path, num_experts: int) -> int:
    """The served model's router groups (config.json n_group; 1 without groups)."""
    import json

    n_group = json.loads((target / "config.json").read_text()).get("n_group") or 1
    return n_group if num_experts % n_group == 0 else 1


def _replay_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in (
        "mapping",
        "balancer",
        "compute ms",
        "all-to-all ms",
        "all-reduce ms",
        "stall ms",
        "max/mean load",
        "migrated MB",
        "MoE tok/s/device",
    ):
        table.add_column(col, justify="left" if col in ("mapping", "balancer") else "right")
    for r in rows:
        table.add_row(
            r["mapping"],
            r["balancer"],
            f"{r['moe_compute_s'] * 1e3:.3f}",
            f"{r['a2a_s'] * 1e3:.3f}",
            f"{r['allreduce_s'] * 1e3:.3f}",
            f"{r['stall_s'] * 1e3:.3f}",
            f"{r['max_over_mean_load']:.2f}",
            f"{r['migrated_bytes'] / 1e6:,.1f}",
            f"{r['moe_tokens_per_s_per_device']:,.0f}",
        )
    return table


def _gains(console: Console, rows: list[dict], unbalanced: str) -> None:
    by = {(r["mapping"], r["balancer"]): r for r in rows}
    base, er, ni = by[("baseline", "none")], by[(unbalanced, "none")], by[(unbalanced, "ni")]
    a2a = base["a2a_s"] / er["a2a_s"] - 1
    compute = er["moe_compute_s"] / ni["moe_compute_s"] - 1
    console.print(
        f"ER-Mapping ({unbalanced}) vs baseline mapping: all-to-all {a2a:+.0%} faster; NI-Balancer vs no "
        f"balancing: MoE compute {compute:+.0%} faster, max/mean load {er['max_over_mean_load']:.2f} -> "
        f"{ni['max_over_mean_load']:.2f}"
    )


def _wafer_section(console: Console, trace_path: Path, out: Path) -> list[Path]:
    from meshserve.demo.replay import MESHES, replay_recorded

    console.rule("3. Wafer simulator: the recorded trace replayed as it is (sums over iterations)")
    by_mesh = replay_recorded(trace_path, out)
    for label, *_, holds in MESHES:
        rows = by_mesh[label]
        console.print(_replay_table(f"tiny-moe's trace on {label}: {holds}", rows))
        _gains(console, rows, "er")
    return [Path(rows[0]["plot"]) for rows in by_mesh.values()]


def _heatmaps(out: Path) -> list[Path]:
    """Link loads of the attention all-reduce and the MoE all-to-all on wsc-8x8, baseline vs ER."""
    from meshserve.wafer.plots import heatmap_png
    from meshserve.wafer.report import run_layer

    paths = []
    for mapping in ("baseline", "er"):
        hw, mo, m, tokens, layer = run_layer(
            "wsc-8x8", "deepseek-v3", 4, mapping, 64, None, 4096, "bottleneck"
        )
        paths.append(heatmap_png(hw, mo, m, tokens, layer, out / f"wafer_heatmap_{mapping}.png"))
    return paths


def run_demo(out_dir: str | Path = "out", target: Path = TINY_MOE, draft: Path = TINY_DRAFT) -> None:
    """Serve, record, replay; print the figures and where the plots went."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(Console().width, 130))
    trace_path = _serving_section(console, out, Path(target), Path(draft))
    _trace_section(console, trace_path, Path(target))
    written = [trace_path, *_wafer_section(console, trace_path, out), *_heatmaps(out)]
    console.rule("files")
    for path in written:
        console.print(f"  {path}")
    console.print(f"demo took {time.perf_counter() - start:.0f} s. What to try next:")
    for line in (
        "meshserve generate --model meshserve/assets/models/tiny-moe --prompt 'def fib(n):' --max-tokens 48",
        "meshserve serve ...            # OpenAI-compatible server (see README)",
        "meshserve bench serve ...      # load generator against any OpenAI-compatible server",
        f"meshserve wafer sweep ... (a sweep's trace: field replays {trace_path})",
        "meshserve wafer reproduce balance --out out   # the paper's balancing ladder",
        "meshserve wafer --help",
    ):
        console.print(f"  {line}")
