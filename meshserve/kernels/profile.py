"""Offline GEMM profile: which SmoothGEMM primitive serves each (linear shape, dtype, M) on this machine.

    meshserve profile --model DIR [--out FILE]     # minutes; see docs/kernels.md

A table is JSON data, not code:

    {"version": 1, "machine": "<cpu> / <threads> threads / torch <version>",
     "gemm": {"bfloat16": {"*": [[32, "packed", 1], [512, "packed_f32", 1]],
                           "1024x512": [[8, "packed", 1], ...]},
              "float32": {...}}}

Under a dtype, a key "NxK" (out x in features) holds that shape's rows; "*" serves shapes not listed.
Each row ``[m_max, kernel, tile]`` serves every M up to m_max (and the last row serves anything larger).
The engine reads the table written for this machine (``user_table_path``) when there is one, else the
shipped default (kernels/profiles/gemm.json); a table written on another machine is ignored.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from meshserve import switches
from meshserve.atomic import write_atomic
from meshserve.errors import InputError
from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import pack_bf16_pairs
from meshserve.kernels.smooth_gemm import (
    KERNELS,
    NATIVE_KERNELS,
    PLAIN,
    GemmChoice,
    pack_weight,
    run_bmm,
    run_choice,
)

SHIPPED_GEMM_TABLE = Path(__file__).parent / "profiles" / "gemm.json"
# M values measured; an M between two of them takes the choice of the next one up.
M_POINTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
TILES = (1, 16, 64)
SLOWER_LIMIT = 1.03  # a chosen primitive measured > 3% slower than F.linear is replaced by F.linear


def machine_id() -> str:
    """What a profile is valid for: CPU model, torch threads and torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} / {torch.get_num_threads()} threads / torch {torch.__version__}"


def user_table_path() -> Path:
    """Where `meshserve profile` writes by default: $MESHSERVE_PROFILE_DIR or ~/.cache/meshserve/profiles
    (beside the attention tiles, kernels/attention_tiles.py)."""
    return switches.profile_dir() / "gemm.json"


def shape_key(n: int, k: int) -> str:
    return f"{n}x{k}"


def bmm_key(e: int, n: int, k: int) -> str:
    """Key of a stacked-expert batched matmul: E experts of [N, K] weights."""
    return f"bmm:{e}x{n}x{k}"


class GemmTable:
    """The profile's GEMM part: per dtype and shape, rows of (m_max, GemmChoice)."""

    def __init__(self, gemm: dict[str, dict[str, list[tuple[int, GemmChoice]]]], machine: str = "") -> None:
        self.gemm = gemm
        self.machine = machine

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "profile") -> GemmTable:
        """Parse and validate; InputError names the file and the bad field."""
        try:
            if data.get("version") != 1:
                raise ValueError(f"version must be 1, got {data.get('version')!r}")
            gemm = {}
            for dtype, shapes in data["gemm"].items():
                gemm[dtype] = {}
                for key, rows in shapes.items():
                    parsed = sorted((int(m), GemmChoice(str(kernel), int(tile))) for m, kernel, tile in rows)
                    if not parsed or parsed[0][0] < 1:
                        raise ValueError(f"gemm.{dtype}.{key}: needs rows with m_max >= 1")
                    gemm[dtype][key] = parsed
            return cls(gemm, str(data.get("machine", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(
                source, f"not a valid GEMM profile ({err}); allowed kernels: {', '.join(KERNELS)}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        gemm = {
            dtype: {key: [[m, c.kernel, c.tile] for m, c in rows] for key, rows in shapes.items()}
            for dtype, shapes in self.gemm.items()
        }
        return {"version": 1, "machine": self.machine, "gemm": gemm}

    @classmethod
    def load(cls, path: str | Path, field: str = "kernel_profile") -> GemmTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(field, f"cannot read GEMM profile {path} ({err})") from None
        if not isinstance(data, dict):
            raise InputError(field, f"{path}: expected a JSON object")
        return cls.from_json(data, field)

    def save(self, path: str | Path) -> Path:
        """Write atomically, one line per shape so the file reads (and diffs) as a table."""
        data = self.to_json()
        dtypes = ",\n".join(
            f"  {json.dumps(dtype)}: {{\n"
            + ",\n".join(f"   {json.dumps(k)}: {json.dumps(rows)}" for k, rows in shapes.items())
            + "\n  }"
            for dtype, shapes in data["gemm"].items()
        )
        text = f'{{"version": 1, "machine": {json.dumps(data["machine"])},\n "gemm": {{\n{dtypes}\n }}\n}}\n'

        return write_atomic(path, text.encode())

    def rows(self, key: str, dtype: torch.dtype) -> list[tuple[int, GemmChoice]]:
        """Rows of a shape key (shape_key or bmm_key); "*" serves keys not listed, else F.linear."""
        shapes = self.gemm.get(str(dtype).removeprefix("torch."), {})
        return shapes.get(key) or shapes.get("*") or [(1, PLAIN)]

    def by_m(self, key: str, dtype: torch.dtype, max_m: int) -> list[GemmChoice]:
        """The choice for every M in 0..max_m (index = M), ready for SmoothLinear.prepare."""
        rows = self.rows(key, dtype)
        out, i = [], 0
        for m in range(max_m + 1):
            while i < len(rows) - 1 and rows[i][0] < m:
                i += 1
            out.append(rows[i][1])
        return out

    def merge(self, other: GemmTable) -> GemmTable:
        """This table with ``other``'s shapes added (other wins where both have one)."""
        gemm = {dtype: dict(shapes) for dtype, shapes in self.gemm.items()}
        for dtype, shapes in other.gemm.items():
            gemm.setdefault(dtype, {}).update(shapes)
        return GemmTable(gemm, other.machine or self.machine)


def load_gemm_table(path: str | Path | None = None) -> GemmTable:
    """The table to run with: ``path`` if given; else this machine's profile if written; else the default."""
    if path is not None:
        return GemmTable.load(path)
    user = user_table_path()
    if user.is_file():
        table = GemmTable.load(user)
        if table.machine == machine_id():
            return table
    return GemmTable.load(SHIPPED_GEMM_TABLE)


def candidates(dtype: torch.dtype, m: int) -> list[GemmChoice]:
    """Primitives worth timing at M = m: oneDNN's with tiles up to 2m (a bigger tile mostly computes
    padding), and for bfloat16 the native op's kernels where it is built."""
    onednn = ("packed", "packed_f32") if dtype != torch.float32 else ("packed",)
    own = NATIVE_KERNELS if dtype == torch.bfloat16 and native.load() else ()
    return (
        [PLAIN]
        + [GemmChoice(kern, t) for kern in onednn for t in TILES if t < 2 * m]
        + [GemmChoice(kern) for kern in own]
    )


def _timer(fn: Callable[[], Any]) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return once


def time_choices(
    choices: list[GemmChoice], x: torch.Tensor, weights: dict[str, Any], reps: int
) -> list[float]:
    """Median seconds of each choice on x."""
    return time_timers([_timer(lambda c=c: run_choice(c, x, **weights)) for c in choices], reps)


def time_timers(timers: list[Callable[[], float]], reps: int) -> list[float]:
    """Median of each timer's runs, interleaved so machine noise hits all of them alike."""
    for t in timers:  # warm-up: oneDNN creates and caches the primitive for this shape
        t()
        t()
    samples: list[list[float]] = [[] for _ in timers]
    for _ in range(reps):
        for i, t in enumerate(timers):
            samples[i].append(t())
    return [statistics.median(s) for s in samples]


def shape_weights(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """A random weight [n, k] and its packed forms, as ``run_choice`` keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    return {
        "weight": w,
        "bias": None,
        "packed": pack_weight(w),
        "packed_f32": pack_weight(w.float()) if dtype != torch.float32 else None,
        "bias_f32": None,
        "pairs": pack_bf16_pairs(w) if dtype == torch.bfloat16 else None,
    }


def profile_shape(
    n: int, k: int, dtype: torch.dtype, max_m: int, reps: int = 7, report: Callable[[str], None] | None = None
) -> list[tuple[int, GemmChoice]]:
    """Rows (m_max, fastest choice) for one linear shape over the M points up to max_m.

    Then the guard: every chosen primitive is timed again against F.linear; one more than 3% slower
    (machine noise, or a choice that only won by luck) is replaced by F.linear.
    """
    weights = shape_weights(n, k, dtype)
    points = [m for m in M_POINTS if m < max_m] + [max_m]
    rows: list[tuple[int, GemmChoice]] = []
    worst = 0.0
    for m in points:
        x = torch.randn(m, k).to(dtype)
        options = candidates(dtype, m)
        best = options[min(range(len(options)), key=time_choices(options, x, weights, reps).__getitem__)]
        if best != PLAIN:
            ours, plain = time_choices([best, PLAIN], x, weights, reps)
            if ours > SLOWER_LIMIT * plain:
                best, ours = PLAIN, plain
            worst = max(worst, ours / plain)
            if report:
                report(
                    f"{shape_key(n, k)} {dtype} M={m}: {best.name} {ours * 1e6:.0f} us vs F.linear "
                    f"{plain * 1e6:.0f} us ({plain / ours:.2f}x)"
                )
        rows.append((m, best))
    if report:
        report(
            f"{shape_key(n, k)} {dtype}: slowest chosen / F.linear = {max(worst, 1.0):.3f} "
            f"(limit {SLOWER_LIMIT:.2f})"
        )
    return _merge_rows(rows)


def _merge_rows(rows: list[tuple[int, GemmChoice]]) -> list[tuple[int, GemmChoice]]:
    """Drop rows whose next row makes the same choice (the table says the same with fewer rows)."""
    out: list[tuple[int, GemmChoice]] = []
    for m, choice in rows:
        if out and out[-1][1] == choice:
            out[-1] = (m, choice)
        else:
            out.append((m, choice))
    return out


def profile_bmm(
    e: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    max_m: int,
    reps: int = 7,
    report: Callable[[str], None] | None = None,
) -> list[tuple[int, GemmChoice]]:
    """Rows for stacked experts [e, n, k] (MoE): torch.bmm in the model dtype or in float32, per capacity M.

    The weight is stored column-major per expert, as the loader leaves it (StackedExperts.transposed_layout).
    """
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(e, k, n, generator=gen) * 0.05).to(dtype).transpose(1, 2)
    weights = {"weight": weight, "weight_f32": weight.float()}
    options = [PLAIN, GemmChoice("packed_f32")]
    rows = []
    for m in [p for p in M_POINTS if p < max_m] + [max_m]:
        x = torch.randn(e, m, k).to(dtype)
        timers = [_timer(lambda c=c, x=x: run_bmm(c, x, **weights)) for c in options]
        times = time_timers(timers, reps)
        best = min(range(len(options)), key=times.__getitem__)
        if times[best] > SLOWER_LIMIT * times[0]:
            best = 0
        rows.append((m, options[best]))
    if report:
        report(f"{bmm_key(e, n, k)} {dtype}: " + ", ".join(f"M<={m} {c.name}" for m, c in _merge_rows(rows)))
    return _merge_rows(rows)


def profile_gemm(
    shapes: Iterable[tuple[int, int]],
    dtypes: Iterable[torch.dtype],
    max_m: int,
    reps: int = 7,
    report: Callable[[str], None] | None = None,
    progress: Callable[[], None] | None = None,
    bmm_shapes: Iterable[tuple[int, int, int]] = (),
) -> GemmTable:
    """Profile every (shape, dtype), and every stacked-expert shape in a non-float32 dtype (in float32 only
    torch.bmm is a candidate); the result holds one row list per shape."""
    gemm: dict[str, dict[str, list[tuple[int, GemmChoice]]]] = {}
    for dtype in dtypes:
        out = gemm.setdefault(str(dtype).removeprefix("torch."), {})
        for n, k in shapes:
            out[shape_key(n, k)] = profile_shape(n, k, dtype, max_m, reps, report)
            if progress:
                progress()
        for e, n, k in bmm_shapes if dtype != torch.float32 else ():
            out[bmm_key(e, n, k)] = profile_bmm(e, n, k, dtype, max_m, reps, report)
    return GemmTable(gemm, machine_id())


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's SmoothLinear layers, in first-seen order."""
    from meshserve.kernels.smooth_gemm import SmoothLinear

    shapes = (tuple(m.weight.shape) for m in model.modules() if isinstance(m, SmoothLinear))
    return list(dict.fromkeys(shapes))


def expert_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """The distinct (experts, out, in) shapes of a model's stacked MoE expert weights."""
    from meshserve.models.layers.moe import StackedExperts

    shapes = (
        tuple(w.shape)
        for m in model.modules()
        if isinstance(m, StackedExperts)
        for w in (m.gate_up_proj, m.down_proj)
    )
    return list(dict.fromkeys(shapes))


def run_profile(
    model_dir: str, out: str | None, dtypes: list[str], max_tokens: int, reps: int, num_threads: int | None
) -> Path:
    """What `meshserve profile` does: time the model's linear shapes, merge into the table, write it."""
    from rich.console import Console
    from tqdm.auto import tqdm

    from meshserve.config import DTYPE_NAMES, EngineConfig
    from meshserve.models.config import parse_dtype
    from meshserve.models.loader import load_model

    for name in dtypes:
        if name not in DTYPE_NAMES:
            raise InputError("dtype", f"unsupported dtype {name!r}; allowed: {', '.join(DTYPE_NAMES)}")
    if max_tokens < 1:
        raise InputError("max_tokens", f"must be >= 1, got {max_tokens}")
    if reps < 1:
        raise InputError("reps", f"must be >= 1, got {reps}")
    config = EngineConfig(model_dir, num_threads=num_threads)  # validates the thread count
    torch.set_num_threads(config.num_threads)
    loaded = load_model(model_dir)
    shapes = linear_shapes(loaded.model)
    console = Console()
    console.print(
        f"profiling {len(shapes)} linear shapes x {len(dtypes)} dtypes, M up to {max_tokens}, "
        f"on {machine_id()}"
    )
    with tqdm(total=len(shapes) * len(dtypes), desc="gemm profile", unit="shape") as bar:
        table = profile_gemm(
            shapes,
            [parse_dtype(d) for d in dtypes],
            max_tokens,
            reps,
            report=lambda line: bar.write(line),
            progress=lambda: bar.update(1),
            bmm_shapes=expert_shapes(loaded.model),
        )
    path = Path(out) if out else user_table_path()
    if path.is_file():
        try:
            old = GemmTable.load(path)
            if old.machine == table.machine:
                table = old.merge(table)
        except InputError:
            pass  # an unreadable old table is replaced
    table.save(path)
    console.print(f"GEMM table written to {path}")
    _profile_attention(loaded.config, [parse_dtype(d) for d in dtypes], console)
    return path


def _profile_attention(cfg: Any, dtypes: list[torch.dtype], console: Any) -> None:
    """The attention-tile profile (kernels/attention_profile.py) for the model's head shape, where the
    native attention op is built; its table goes to its own file beside this one."""
    from meshserve.kernels.attention_profile import profile_attention

    if not native.load():
        console.print(f"attention tiles: native op not built (`{native.BUILD_COMMAND}`); shipped tiles stay")
        return
    for dtype in dtypes:
        best = profile_attention(cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, dtype)
        console.print(f"attention tiles {dtype}: {best}")
