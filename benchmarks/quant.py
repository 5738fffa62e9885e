"""Weight-only quantization: quality, decode speed and resident weight memory of int8 / int4 against bfloat16.

    flock /tmp/bench.lock python benchmarks/quant.py --dir /tmp/qload-quant [--layers 4] [--decode-tokens 16]

1. Quality on the shipped tiny-moe (meshserve/assets/models/tiny-moe, trained on the stdlib corpus): held-out
   perplexity (``--windows`` windows of ``--window`` tokens from the held-out files, every position scored)
   in bfloat16 and with int8 / int4 made at load.
2. On random ~1B Llama shapes (benchmarks/load.py's DENSE, ``--layers`` of its 16 layers; written once to
   ``--dir``): mean KL(bf16 || quantized) of the next-token distributions and top-1 agreement over one
   prompt's positions; decode tok/s at batch 1 (``--decode-tokens`` tokens timed after the first; best of
   two runs), prefill tok/s of one ``--prefill-tokens`` prompt in one step (M = 256 by default: the
   quantized GEMMs' large-M path, kernels/profiles/quant.json; best of two) and the resident weight bytes:
   the whole model, and the quantized layers against their bfloat16 size. int8 / int4 quantize the lm_head
   too (their default), the tied input embedding reading its quantized rows; ``--keep-head`` adds rows with
   the head kept in bfloat16.
The quantized GEMMs run whatever meshserve/models/layers/quant_linear.py's ``quant_linear`` picks.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from meshserve.engine import LLM, SamplingParams
from meshserve.models import load_model
from meshserve.models.loader import model_bytes
from meshserve.models.quant.layout import quantized_split
from meshserve.testing import PagedSequences
from meshserve.training.corpus import read_held_out

METHODS = (None, "int8", "int4")
TINY_MOE = Path(__file__).resolve().parent.parent / "meshserve" / "assets" / "models" / "tiny-moe"


def name(method: str | None) -> str:
    return method or "bf16"


def logits(lm, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] (float32), the whole sequence in one prefill."""
    blocks = -(-len(ids) // 16) + 1
    seqs = PagedSequences(lm, num_blocks=blocks, block_size=16)
    s = seqs.add(ids)
    return seqs.step({s: len(ids)})[s]


def perplexity(method: str | None, windows: list[list[int]]) -> float:
    lm = load_model(TINY_MOE, dtype="bfloat16", quantization=method)
    nll, count = 0.0, 0
    for ids in windows:
        logp = torch.log_softmax(logits(lm, ids)[:-1], dim=-1)
        target = torch.tensor(ids[1:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(ids) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def held_out_windows(n: int, length: int) -> list[list[int]]:
    tokenizer = load_model(TINY_MOE).tokenizer
    texts = [t for _, t in sorted(read_held_out().items()) if len(t) > 8 * length]
    return [tokenizer.encode(t)[:length] for t in texts[:n]]


def rates(
    path: Path, method: str | None, tokens: int, prefill: int, head: bool | None = None
) -> tuple[float, float, int, int, int]:
    """Decode tok/s at batch 1 and prefill tok/s of one ``prefill``-token prompt (best of two each), model
    bytes, and the quantized layers' (packed, bf16) bytes."""
    with LLM(
        str(path),
        dtype="bfloat16",
        quantization=method,
        quantize_lm_head=head,
        max_num_seqs=1,
        max_model_len=max(256, prefill + 1),
        max_num_batched_tokens=max(256, prefill),
        enable_prefix_caching=False,
    ) as llm:

        def run(n: int, prompt_len: int = 32) -> float:
            prompt = {"prompt_token_ids": [3 + i % 1000 for i in range(prompt_len)]}
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start

        run(2)  # warm-up
        rate = max(tokens / (run(tokens + 1) - run(1)) for _ in range(2))
        run(1, prefill)  # warm-up at the prefill's M
        prefill_rate = max(prefill / run(1, prefill) for _ in range(2))  # the prompt's step and one sample
        model = llm.engine.model
        packed, dense = quantized_split(model)
        return rate, prefill_rate, model_bytes(model), packed, dense


def write_dense(path: Path, config: dict) -> None:
    """A random bfloat16 Llama of `config`'s shape with its projections at transformers' init spread
    (initializer_range 0.02): make_tiny_model's wider test spread (WEIGHT_STD) makes a 2048-wide residual
    stream grow ~3.6x a layer, and such a model's logits flip under any rounding, bf16's own included."""
    from safetensors.torch import load_file, save_file

    from meshserve.testing import WEIGHT_STD, make_tiny_model

    make_tiny_model(path, arch="llama", dtype="bfloat16", **config)
    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        scale = config.get("initializer_range", 0.02) / WEIGHT_STD
        tensors = {k: (v * scale if k.endswith("proj.weight") else v) for k, v in tensors.items()}
        save_file(tensors, str(file), {"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", default="/tmp/qload-quant", help="where the random ~1B checkpoint is written"
    )
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 16 of Llama-3.2-1B")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=256, help="the prefill row's prompt (M)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sections", default="quality,speed", help="comma-separated: quality, speed")
    parser.add_argument("--keep-head", action="store_true", help="speed: also int8 / int4 with a bf16 head")
    args = parser.parse_args()
    from load import DENSE  # benchmarks/load.py: Llama-3.2-1B's shape

    sections = set(args.sections.split(","))
    print(f"load average {os.getloadavg()[0]:.2f}; threads {torch.get_num_threads()}")
    path = Path(args.dir) / f"llama-1b-{args.layers}l-init002"
    if not (path / "config.json").exists():
        write_dense(path, {**DENSE, "num_hidden_layers": args.layers})
    if "quality" in sections:
        quality(path, args)
    if "speed" in sections:
        speed(path, args.decode_tokens, args.prefill_tokens, args.keep_head)
    print(f"load average {os.getloadavg()[0]:.2f}")


def quality(path: Path, args: argparse.Namespace) -> None:
    windows = held_out_windows(args.windows, args.window)
    ppl = {name(m): perplexity(m, windows) for m in METHODS}
    print(
        f"tiny-moe held-out perplexity ({len(windows)} x {args.window} tokens): "
        + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
    )
    vocab = load_model(path).config.vocab_size
    ids = [1] + torch.randint(3, vocab, (127,), generator=torch.Generator().manual_seed(0)).tolist()
    base = torch.log_softmax(logits(load_model(path, dtype="bfloat16"), ids), dim=-1)
    others = {"float32 (the floor: bf16's own rounding)": ("float32", None)}
    others |= {m: ("bfloat16", m) for m in METHODS[1:]}
    for label, (dtype, method) in others.items():
        logp = torch.log_softmax(logits(load_model(path, dtype=dtype, quantization=method), ids), dim=-1)
        kl = float((base.exp() * (base - logp)).sum(-1).mean())
        top1 = float((base.argmax(-1) == logp.argmax(-1)).float().mean())
        print(f"~1B shapes ({args.layers} layers), {label} vs bf16: mean KL {kl:.5f}, top-1 {top1:.3f}")


def speed(path: Path, tokens: int, prefill: int, keep_head: bool) -> None:
    rows = {name(m): rates(path, m, tokens, prefill) for m in METHODS}
    if keep_head:
        rows |= {f"{m} (bf16 head)": rates(path, m, tokens, prefill, head=False) for m in METHODS[1:]}
    bf16_rate, bf16_prefill, bf16_bytes = rows["bf16"][0], rows["bf16"][1], rows["bf16"][2]
    for key, (rate, pre, total, packed, dense) in rows.items():
        layers = f", quantized layers {packed / dense:.3f}x their bf16 bytes" if dense else ""
        print(
            f"{key}: decode {rate:.2f} tok/s ({rate / bf16_rate:.2f}x bf16), prefill ({prefill} tokens) "
            f"{pre:.1f} tok/s ({pre / bf16_prefill:.2f}x bf16), weights {total / 2**20:.0f} MiB "
            f"({total / bf16_bytes:.3f}x bf16){layers}"
        )


if __name__ == "__main__":
    main()
