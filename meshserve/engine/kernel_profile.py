"""Kernel profiles for a loaded model: `meshserve profile` (offline, thorough) and the engine's own
profile of the shapes its machine has no table for (first use, bounded to seconds, cached).

Above the kernels on purpose: this module knows models and engine settings; kernels/profile.py knows
only shapes and tables.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from meshserve import switches
from meshserve.errors import InputError
from meshserve.kernels import native
from meshserve.kernels.profile import (
    GemmTable,
    bmm_key,
    load_gemm_table,
    machine_id,
    machine_table,
    profile_bmm,
    profile_shape,
    read_table,
    shape_key,
    user_table_path,
)
from meshserve.kernels.smooth_gemm import SmoothLinear
from meshserve.models.layers.moe import StackedExperts

logger = logging.getLogger(__name__)

# First-use profile: fewer M points and runs than `meshserve profile`, and a wall-clock budget; shapes
# left when it runs out keep the stand-in table and are measured on a later start.
AUTO_M_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
AUTO_REPS = 3
AUTO_SECONDS = 20.0


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a model's SmoothLinear layers, in first-seen order."""
    shapes = (tuple(m.weight.shape) for m in model.modules() if isinstance(m, SmoothLinear))
    return list(dict.fromkeys(shapes))


def expert_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """The distinct (experts, out, in) shapes of a model's stacked MoE expert weights."""
    shapes = (
        tuple(w.shape)
        for m in model.modules()
        if isinstance(m, StackedExperts)
        for w in (m.gate_up_proj, m.down_proj)
    )
    return list(dict.fromkeys(shapes))


def auto_profile_enabled() -> bool:
    """MESHSERVE_PROFILE=off skips the first-use profile (the stand-in table serves)."""
    return switches.value("MESHSERVE_PROFILE") == "on"


def missing_work(
    model: torch.nn.Module, table: GemmTable | None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(kind, shape, dtype) of every GEMM of the model that ``table`` (this machine's) has no rows for.
    Stacked experts count only outside float32, where torch.bmm is the one candidate."""
    linears = {tuple(m.weight.shape): m.weight.dtype for m in model.modules() if isinstance(m, SmoothLinear)}
    experts = {
        tuple(w.shape): w.dtype
        for m in model.modules()
        if isinstance(m, StackedExperts)
        for w in (m.gate_up_proj, m.down_proj)
        if w.dtype != torch.float32
    }
    wanted = [("linear", s, d, shape_key(*s)) for s, d in linears.items()]
    wanted += [("bmm", s, d, bmm_key(*s)) for s, d in experts.items()]
    have = table.gemm if table is not None else {}
    return [(kind, s, d) for kind, s, d, key in wanted if key not in have.get(_dtype_name(d), {})]


def profile_missing(
    model: torch.nn.Module, max_tokens: int, seconds: float | None = None, show: bool = True
) -> GemmTable | None:
    """Measure the model's shapes this machine has no table for, within ``seconds``, and cache them
    (merged into the user's table for this machine key). Returns the shapes measured, or None if none."""
    from tqdm.auto import tqdm

    machine = machine_id()
    work = missing_work(model, machine_table(machine))
    if not work:
        return None
    seconds = AUTO_SECONDS if seconds is None else seconds
    deadline = time.monotonic() + seconds
    gemm: dict[str, dict[str, list]] = {}
    with tqdm(
        total=len(work), desc=f"profiling GEMMs for {machine} (once)", unit="shape", disable=not show
    ) as bar:
        for kind, shape, dtype in work:
            if time.monotonic() > deadline:
                bar.write(f"profile budget ({seconds:.0f} s) spent; the rest is measured on a later start")
                break
            if kind == "linear":
                key = shape_key(*shape)
                rows = profile_shape(*shape, dtype, max_tokens, AUTO_REPS, None, AUTO_M_POINTS, deadline)
            else:
                key = bmm_key(*shape)
                rows = profile_bmm(*shape, dtype, max_tokens, AUTO_REPS, None, AUTO_M_POINTS, deadline)
            if not rows:  # the budget ran out before its first M point: the stand-in serves it until then
                bar.write(f"profile budget ({seconds:.0f} s) spent; the rest is measured on a later start")
                break
            gemm.setdefault(_dtype_name(dtype), {})[key] = rows
            bar.update(1)
    if not gemm:
        return None
    measured = GemmTable(gemm, machine)
    path = user_table_path(machine)
    old = read_table(path)  # an unreadable cache is replaced
    (measured if old is None or old.machine != machine else old.merge(measured)).save(path)
    count = sum(len(shapes) for shapes in gemm.values())
    logger.info("kernel profile: %d shapes measured for %s, cached in %s", count, machine, path)
    return measured


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gemm_table_for(model: torch.nn.Module, kernel_profile: str | None, max_tokens: int) -> GemmTable:
    """The engine's GEMM table: ``kernel_profile`` if given; else this machine's measured shapes (profiling
    the missing ones first, unless MESHSERVE_PROFILE=off) over the stand-in table."""
    if kernel_profile is None and auto_profile_enabled():
        profile_missing(model, max_tokens)
    return load_gemm_table(kernel_profile)


def run_profile(
    model_dir: str, out: str | None, dtypes: list[str], max_tokens: int, reps: int, num_threads: int | None
) -> Path:
    """What `meshserve profile` does: time the model's linear shapes, merge into the table, write it."""
    from rich.console import Console
    from tqdm.auto import tqdm

    from meshserve.config import DTYPE_NAMES, EngineConfig
    from meshserve.kernels.profile import profile_gemm
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
