"""The kernel each op of a forward runs here, under the installed switches: what `meshserve env` prints
beside them, so a bug report says which code ran. Each line asks the function the forward asks."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import torch

from meshserve.kernels import native
from meshserve.kernels.attention import attention_backend
from meshserve.kernels.attention_tiles import isa_tag
from meshserve.kernels.fused import use_fused
from meshserve.kernels.fused_moe import use_fused_moe
from meshserve.kernels.profile import load_gemm_table, machine_id, user_table_path
from meshserve.kernels.quant_gemm import brgemm_min_rows

BUILD_HINT = f"build with `{native.BUILD_COMMAND}`"


def kernel_paths() -> dict[str, str]:
    """Op -> the path it takes on this machine (CPU in float32 / bfloat16, and CUDA)."""
    with warnings.catch_warnings():  # a missing build is reported below, not warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        built = native.load()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.inference_mode():
        fused = {dtype: use_fused(torch.empty(0, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16)}
    user_table = user_table_path()
    own_table = user_table.is_file() and load_gemm_table().machine == machine_id()
    return {
        "machine": f"{machine_id()} / ISA {isa_tag()}",
        "native build": f"{native.library_path()} ({'loaded' if built else 'missing: ' + BUILD_HINT})",
        "attention cpu float32": attention_backend(cpu, torch.float32),
        "attention cpu bfloat16": attention_backend(cpu, torch.bfloat16),
        "attention cuda": attention_backend(cuda, torch.bfloat16),
        "fused elementwise cpu": ", ".join(
            f"{str(d).removeprefix('torch.')} {'native' if on else 'reference'}" for d, on in fused.items()
        ),
        "fused moe cpu": "native" if use_fused_moe(torch.bfloat16, 2) else "reference",
        "gemm table": str(user_table) if own_table else "shipped default (no profile of this machine)",
        "quantized gemm cpu bfloat16": quant_paths(brgemm_min_rows()),
        "cuda": f"available ({torch.cuda.device_count()} devices)" if torch.cuda.is_available() else "absent",
        "triton": "installed" if importlib.util.find_spec("triton") is not None else "absent",
    }


def quant_paths(brgemm_rows: int) -> str:
    """The int8 / int4 GEMMs' paths by rows (kernels/profiles/quant.json for this ISA)."""
    if brgemm_rows == sys.maxsize:
        return "register tiles at every M (no brgemm path listed for this ISA)"
    return f"register tiles below {brgemm_rows} rows, dequantized blocks through oneDNN's brgemm from there"
