"""Build and load meshserve's native CPU operators (kernels/csrc/*.cpp) against the installed torch.

    python -m meshserve.kernels.native      # what `make run` / `make test` do after installing

Every machine compiles its own copy (-O3 -march=native); nothing prebuilt is ever downloaded. The build
directory is keyed by the sources, torch version, compiler flags and this CPU's model and ISA flags, so a
build made by another machine, another torch or older sources is never loaded: it is simply not found.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import torch
from torch.utils import cpp_extension

from meshserve import switches
from meshserve.atomic import atomic_path

CSRC = Path(__file__).parent / "csrc"
# Git-ignored, inside the checkout so `make clean` and a fresh clone start from nothing (MESHSERVE_BUILD_DIR
# moves it).
DEFAULT_BUILD_ROOT = Path(__file__).parents[2] / "build" / "native"
# -fno-trapping-math: without it GCC keeps any loop calling floor (fast_exp.h) scalar; results are unchanged.
CFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-trapping-math",
    "-fopenmp",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-w",
]
BUILD_COMMAND = f"{sys.executable} -m meshserve.kernels.native"


def _cpu_signature() -> str:
    """CPU model and ISA flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


@cache
def library_path() -> Path:
    """Where this machine's build of the current sources lives (it may not exist yet)."""
    key = hashlib.sha256()
    for part in (torch.__version__, " ".join(CFLAGS), _cpu_signature(), platform.python_version()):
        key.update(part.encode())
    for src in [*_sources(), *sorted(CSRC.glob("*.h"))]:  # headers too: a change must rebuild
        key.update(src.read_bytes())
    root = Path(switches.value("MESHSERVE_BUILD_DIR") or DEFAULT_BUILD_ROOT)
    return root / key.hexdigest()[:16] / "meshserve_native.so"


def _compile_command(out: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    links = [f"-L{p}" for p in libdirs] + [f"-Wl,-rpath,{p}" for p in libdirs]
    return [
        "g++",
        *CFLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        *map(str, _sources()),
        *links,
        "-lc10",
        "-ltorch_cpu",
        "-o",
        str(out),
    ]


def build(force: bool = False) -> Path:
    """Compile the operators into library_path() (skipped when that build exists); returns its path."""
    out = library_path()
    if out.exists() and not force:
        return out
    with atomic_path(out) as tmp:  # a half-written library is never left where loaders look
        subprocess.run(_compile_command(tmp), check=True)
    return out


@cache
def load() -> bool:
    """Load the operators into torch.ops.meshserve; False (with a loud warning) when not built here."""
    path = library_path()
    if not path.exists():
        warnings.warn(
            f"meshserve native kernels are not built for this machine/torch ({path} missing): attention runs "
            f"the slow torch reference. Build them with `{BUILD_COMMAND}` (make run / make test do).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    torch.ops.load_library(str(path))
    from meshserve.kernels import bf16_gemm, fused, fused_moe, meta_attention_native, quant_gemm

    meta_attention_native.register_fake()
    bf16_gemm.register_fake()
    fused.register_fake()
    fused_moe.register_fake()
    quant_gemm.register_fake()
    return True


if __name__ == "__main__":
    print(build())
