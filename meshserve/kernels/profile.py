"""GEMM profile tables: which SmoothGEMM primitive serves each (linear shape, dtype, M) on this machine.

    meshserve profile --model DIR [--out FILE]     # minutes; see docs/gemm.md
    (or nothing: the engine profiles a model's missing shapes on first use, engine/kernel_profile.py)

A table is JSON data, not code:

    {"version": 1, "machine": "<isa tag> / <threads> threads",
     "gemm": {"bfloat16": {"*": [[32, "packed", 1], [512, "packed_f32", 1]],
                           "1024x512": [[8, "packed", 1], ...]},
              "float32": {...}}}

Under a dtype, a key "NxK" (out x in features) holds that shape's rows; "*" serves shapes not listed.
Each row ``[m_max, kernel, tile]`` serves every M up to m_max (and the last row serves anything larger).
A table is valid for the machine key it names (kernels/cpu.py: ISA tag and threads, never the CPU's
name). The engine reads this machine's measured table (``user_table_path``) merged over the shipped ones
(kernels/profiles/gemm*.json) with the same key; see ``load_gemm_table``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from meshserve.atomic import write_atomic
from meshserve.errors import InputError
from meshserve.kernels import native
from meshserve.kernels.bf16_gemm import pack_bf16_pairs, pack_bf16_panels
from meshserve.kernels.cpu import machine_key, parse_machine_key, profile_dir
from meshserve.kernels.smooth_gemm import (
    KERNELS,
    NATIVE_KERNELS,
    PLAIN,
    GemmChoice,
    pack_weight,
    run_bmm,
    run_choice,
)

SHIPPED_DIR = Path(__file__).parent / "profiles"
SHIPPED_GEMM_TABLE = SHIPPED_DIR / "gemm.json"
# M values measured; an M between two of them takes the choice of the next one up.
M_POINTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
TILES = (1, 16, 64)
SLOWER_LIMIT = 1.03  # a chosen primitive measured > 3% slower than F.linear is replaced by F.linear


def machine_id() -> str:
    """What a profile is valid for: this CPU's ISA tag and torch's thread count (kernels/cpu.py)."""
    return machine_key()


def user_table_path(machine: str | None = None) -> Path:
    """Where this machine's measured table lives (one file per machine key, beside the attention tiles):
    e.g. ~/.cache/meshserve/profiles/gemm-avx512_bf16-2t.json."""
    isa, threads = parse_machine_key(machine or machine_id()) or ("unknown", 0)
    return profile_dir() / f"gemm-{isa}-{threads}t.json"


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


def shipped_tables() -> list[GemmTable]:
    """Every table shipped with the package (kernels/profiles/gemm*.json)."""
    return [GemmTable.load(p) for p in sorted(SHIPPED_DIR.glob("gemm*.json"))]


def read_table(path: Path) -> GemmTable | None:
    """A cached table, or None where absent or unreadable (a broken cache is re-measured, not fatal)."""
    try:
        return GemmTable.load(path) if path.is_file() else None
    except InputError:
        return None


def machine_table(machine: str | None = None) -> GemmTable | None:
    """The tables measured for exactly this machine key (shipped, then this user's cache over them)."""
    machine = machine or machine_id()
    table = None
    for found in [*shipped_tables(), read_table(user_table_path(machine))]:
        if found is not None and found.machine == machine:
            table = found if table is None else table.merge(found)
    return table


def stand_in_table(machine: str | None = None) -> GemmTable:
    """What serves shapes this machine has no measurement for: a shipped table of the same ISA tag (the
    nearest thread count), else none, i.e. F.linear everywhere (a kernel tuned for another ISA can lose
    to oneDNN, as the FMA kernels do on AMX)."""
    isa, threads = parse_machine_key(machine or machine_id()) or ("", 0)
    same_isa = [
        (abs(key[1] - threads), t.machine, t)
        for t in shipped_tables()
        if (key := parse_machine_key(t.machine)) and key[0] == isa
    ]
    return min(same_isa, key=lambda row: row[:2])[2] if same_isa else GemmTable({}, machine or machine_id())


def load_gemm_table(path: str | Path | None = None) -> GemmTable:
    """The table to run with: ``path`` if given; else this machine's measured shapes over the stand-in."""
    if path is not None:
        return GemmTable.load(path)
    base = stand_in_table()
    exact = machine_table()
    return base if exact is None else base.merge(exact)


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
        "panels": pack_bf16_panels(w) if dtype == torch.bfloat16 else None,
    }


@torch.inference_mode()  # as the engine runs them: the shared staging buffers may be inference tensors
def profile_shape(
    n: int,
    k: int,
    dtype: torch.dtype,
    max_m: int,
    reps: int = 7,
    report: Callable[[str], None] | None = None,
    m_points: tuple[int, ...] = M_POINTS,
    deadline: float | None = None,
) -> list[tuple[int, GemmChoice]]:
    """Rows (m_max, fastest choice) for one linear shape over the M points (``m_points``) up to max_m;
    M points that would end past ``deadline`` (time.monotonic) are not measured and take F.linear, and a
    shape with no M point measured gets no rows (so a table lists only what was measured; the stand-in
    table serves it until a later profile does).

    Then the guard: every chosen primitive is timed again against F.linear; one more than 3% slower
    (machine noise, or a choice that only won by luck) is replaced by F.linear.
    """
    weights = shape_weights(n, k, dtype)
    rows: list[tuple[int, GemmChoice]] = []
    worst = 0.0
    for m in _paced([m for m in m_points if m < max_m] + [max_m], deadline):
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
    return _merge_rows(_rest_plain(rows, max_m)) if rows else []


def _paced(points: list[int], deadline: float | None) -> Iterator[int]:
    """The M points in order while the next one, predicted from the last one's time scaled by M, ends
    before ``deadline``; all of them when it is None."""
    last: tuple[int, float] | None = None
    for m in points:
        start = time.monotonic()
        predicted = 0.0 if last is None else last[1] * m / last[0]
        if deadline is not None and start + predicted > deadline:
            return
        yield m
        last = (m, time.monotonic() - start)


def _rest_plain(rows: list[tuple[int, GemmChoice]], max_m: int) -> list[tuple[int, GemmChoice]]:
    """Rows measured up to some M, with F.linear serving the M points left unmeasured up to max_m."""
    return rows if rows and rows[-1][0] >= max_m else [*rows, (max_m, PLAIN)]


def _merge_rows(rows: list[tuple[int, GemmChoice]]) -> list[tuple[int, GemmChoice]]:
    """Drop rows whose next row makes the same choice (the table says the same with fewer rows)."""
    out: list[tuple[int, GemmChoice]] = []
    for m, choice in rows:
        if out and out[-1][1] == choice:
            out[-1] = (m, choice)
        else:
            out.append((m, choice))
    return out


@torch.inference_mode()
def profile_bmm(
    e: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    max_m: int,
    reps: int = 7,
    report: Callable[[str], None] | None = None,
    m_points: tuple[int, ...] = M_POINTS,
    deadline: float | None = None,
) -> list[tuple[int, GemmChoice]]:
    """Rows for stacked experts [e, n, k] (MoE): torch.bmm in the model dtype or in float32, per capacity M
    (M points past ``deadline`` take torch.bmm, and none measured gives no rows, as in profile_shape).

    The weight is stored column-major per expert, as the loader leaves it (StackedExperts.transposed_layout).
    """
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(e, k, n, generator=gen) * 0.05).to(dtype).transpose(1, 2)
    weights = {"weight": weight, "weight_f32": weight.float()}
    options = [PLAIN, GemmChoice("packed_f32")]
    rows = []
    for m in _paced([p for p in m_points if p < max_m] + [max_m], deadline):
        x = torch.randn(e, m, k).to(dtype)
        timers = [_timer(lambda c=c, x=x: run_bmm(c, x, **weights)) for c in options]
        times = time_timers(timers, reps)
        best = min(range(len(options)), key=times.__getitem__)
        if times[best] > SLOWER_LIMIT * times[0]:
            best = 0
        rows.append((m, options[best]))
    if report:
        report(f"{bmm_key(e, n, k)} {dtype}: " + ", ".join(f"M<={m} {c.name}" for m, c in _merge_rows(rows)))
    return _merge_rows(_rest_plain(rows, max_m)) if rows else []


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
