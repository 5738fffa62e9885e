"""Load memory and time: meshserve beside transformers on ~1B random bfloat16 checkpoints written to disk.

    flock /tmp/meshserve-heavy.lock python benchmarks/load.py --dir /tmp/h22load-load   # ~5 GB of files

Writes (once) a dense checkpoint of Llama-3.2-1B's shape and a Mixtral-layout MoE (32 experts, top-8,
vocab 32k) of about the same size, then measures each loader in its own process:

- ``meshserve load``: ``load_model`` alone (the loader: meta build, weights read once);
- ``meshserve engine``: a whole ``Engine`` (load, kernel packing, a KV cache of ``--kv-gib``; the GEMM table
  ``--kernel-profile``, default this machine's), then ``served``: RSS after one short greedy generate;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dtype=torch.bfloat16)``.

Each row: RSS after imports (the runtime's fixed size, ``base``), peak RSS (VmHWM) and steady RSS after
loading, each less base and the engine's KV cache as a ratio to the checkpoint's weight bytes, and seconds;
with ``--decode``, the engine's batch-1 decode tok/s (``decode_rate``) after that.
transformers maps the safetensors and leaves bfloat16 tensors as views of the map, so its weights become
resident only when read: every row reads each weight once after loading (``touched``: steady RSS then, as a
ratio) so all count what serving holds. ``--delete`` removes the checkpoints afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DENSE = {  # Llama-3.2-1B's config.json shape
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
MOE = {  # Mixtral layout at ~1.3B: 32 experts, top-8
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 32,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
}
MODELS = {"dense": ("llama", DENSE), "moe": ("mixtral", MOE)}
WHO = ("meshserve-load", "meshserve-engine", "transformers")


def rss(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def weight_mib(path: Path) -> float:
    from meshserve.models.weights import Checkpoint

    return Checkpoint(path).nbytes / (1 << 20)


def decode_rate(engine: object, rounds: int = 3) -> float:
    """Batch-1 decode tok/s of a loaded Engine (vllm_race's decode1): one 32-token prompt -> 64 greedy
    tokens (EOS ignored, prefill included), the median of ``rounds`` after a warm-up, new prompts each."""
    import statistics

    from meshserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    rates = []
    for r in range(rounds + 1):
        engine.add_request([10 + (7 * r + 13 * i) % 30000 for i in range(32)], params, detokenize=False)
        start, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(o.token_ids) for o in engine.step())  # finished requests only
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def measure(
    who: str, path: Path, kv_gib: float, profile: str | None = None, decode: bool = False
) -> dict[str, float]:
    """One loader in this (fresh) process: imports first, then the load, timed."""
    import torch

    if who == "transformers":
        here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow the `kernels` package
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        from transformers import AutoModelForCausalLM

        def load() -> object:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif who == "meshserve-load":
        from meshserve.models.loader import load_model

        def load() -> object:
            return load_model(path)
    else:
        from meshserve.engine import Engine
        from meshserve.kernels import native

        native.load()  # the kernels' library is part of the runtime, not of the load

        def load() -> object:
            return Engine.from_args(
                str(path), kv_cache_memory=kv_gib, max_model_len=2048, max_num_seqs=8, kernel_profile=profile
            )

    gc.collect()
    base = rss("VmRSS")
    start = time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - start
    gc.collect()
    kv = kv_gib * 1024 if who == "meshserve-engine" else 0.0
    out = {"base": base, "peak": rss("VmHWM"), "steady": rss("VmRSS"), "kv": kv, "seconds": seconds}
    model = getattr(loaded, "model", loaded)
    tensors = list(model.parameters()) + [
        p for m in model.modules() for p in getattr(m, "packed", None) or ()
    ]
    for t in tensors:  # read every weight once (meta ones hold nothing), 16M elements at a time
        if not t.is_meta and t.numel():
            rows = max(1, (1 << 24) * t.shape[0] // t.numel()) if t.dim() else 1
            for chunk in t.split(rows) if t.dim() else [t]:
                chunk.float().sum()
    out["touched"] = rss("VmRSS")
    if who == "meshserve-engine":  # serving: one prompt of 64 tokens, 8 greedy tokens out
        from meshserve import SamplingParams

        loaded.add_request(list(range(1, 65)), SamplingParams(temperature=0, max_tokens=8), detokenize=False)
        while loaded.has_unfinished():
            loaded.step()
        out["served"] = rss("VmRSS")
        if decode:
            out["decode"] = decode_rate(loaded)
    del loaded
    return out


def write(name: str, path: Path) -> None:
    from meshserve.testing import make_tiny_model

    arch, config = MODELS[name]
    print(f"writing {name} to {path} ...", flush=True)
    make_tiny_model(path, arch=arch, dtype="bfloat16", num_shards=4, **config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/meshserve-load"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--who", nargs="+", choices=WHO, default=list(WHO))
    parser.add_argument("--kv-gib", type=float, default=0.25, help="the engine's KV cache (GiB)")
    parser.add_argument("--kernel-profile", help="GEMM table JSON for the engine (default: this machine's)")
    parser.add_argument("--delete", action="store_true", help="remove the checkpoints afterwards")
    parser.add_argument(
        "--decode", action="store_true", help="engine rows: also batch-1 decode tok/s (decode_rate)"
    )
    parser.add_argument("--measure", nargs=2, metavar=("WHO", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        who, path = args.measure[0], Path(args.measure[1])
        print(json.dumps(measure(who, path, args.kv_gib, args.kernel_profile, args.decode)))
        return
    print(
        f"{'model':6} {'loader':17} {'weights':>8} {'base':>6} {'peak':>7} {'ratio':>6} {'steady':>7} "
        f"{'ratio':>6} {'touched':>7} {'ratio':>6} {'served':>7} {'ratio':>6} {'seconds':>7} {'tok/s':>6}",
        flush=True,
    )
    for name in args.models:
        path = args.dir / name
        if not (path / "config.json").is_file():
            write(name, path)
        weights = weight_mib(path)
        for who in args.who:
            cmd = [sys.executable, __file__, "--measure", who, str(path), "--kv-gib", str(args.kv_gib)]
            cmd += ["--kernel-profile", args.kernel_profile] if args.kernel_profile else []
            cmd += ["--decode"] if args.decode else []
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            r.setdefault("served", float("nan"))
            r.setdefault("decode", float("nan"))
            ratio = {
                k: (r[k] - r["base"] - r["kv"]) / weights for k in ("peak", "steady", "touched", "served")
            }
            print(
                f"{name:6} {who:17} {weights:8.0f} {r['base']:6.0f} {r['peak']:7.0f} {ratio['peak']:5.2f}x "
                f"{r['steady']:7.0f} {ratio['steady']:5.2f}x {r['touched']:7.0f} {ratio['touched']:5.2f}x "
                f"{r['served']:7.0f} {ratio['served']:5.2f}x {r['seconds']:7.1f} {r['decode']:6.1f}",
                flush=True,
            )
        if args.delete:
            shutil.rmtree(path)
    print("MiB; each ratio is (RSS - base - KV cache) / weights; one process per row; tok/s: --decode")


if __name__ == "__main__":
    main()
