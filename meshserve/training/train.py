"""`meshserve train-tiny`: train the shipped MoE target and its dense draft together, to a budget.

One loop, one batch per step for both models: the target learns next-token prediction (+ a small
router balance loss), the draft learns from the data and from the target's logits on the same batch
(distillation for free: the target's forward already ran), so the draft agrees with the target often,
which is what speculative decoding needs. The learning rate follows a cosine over the budget: a number
of tokens (the same run on any machine; `tokens`) or of minutes (ends annealed whatever the machine's
speed). Checkpoints every few minutes; `--resume` continues one. A draft-only stage (`draft_only`,
`init`) starts from another run's checkpoint, freezes its target and distils the draft alone: the
target then only runs forward, so a token costs a fraction of a joint step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from meshserve.atomic import atomic_path, write_atomic
from meshserve.errors import require
from meshserve.training.corpus import BOS_ID, EOS_ID, SPECIAL_TOKENS, read_split, stdlib_root, train_tokenizer
from meshserve.training.model import TinyCausalLM

PRESET = Path(__file__).with_name("models.yaml")
ARCH_FIELDS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False},
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "sliding_window": None,
        "router_jitter_noise": 0.0,
    },
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "q_lora_rank": None,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "rope_interleave": True,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "attention_bias": False,
    },
}
# Kept float32 in the bfloat16 export, as DeepSeek ships them and transformers keeps them: the router's
# sigmoid scores sit close together, and a rounded bias would change which experts are chosen.
FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


@dataclass
class TrainSettings:
    minutes: float = 45.0
    tokens: int | None = None  # token budget: the cosine and the stop follow tokens seen, not minutes
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 4
    lr_target: float = 3e-3
    lr_draft: float = 4e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    balance_coef: float = 0.01
    bias_update: float = 1e-3  # aux-loss-free router bias step (DeepSeek-V3's gamma); grouped MoE only
    distill_weight: float = 0.5
    threads: int = 2
    autocast_bf16: bool = False
    eval_windows: int = 64
    checkpoint_minutes: float = 5.0
    max_steps: int | None = None  # stop early after this many steps (tests); None = the budget only
    draft_only: bool = False  # train the draft alone against init's frozen target
    init: str | None = None  # a checkpoint.pt whose target and draft weights start a draft_only stage


def load_preset(path: Path = PRESET) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def prepare_data(
    work: Path, vocab_size: int, root: Path | None = None
) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict[str, Any]]:
    """Tokenizer + train / held-out token streams (<s> before each file), cached under `work`."""
    tok_file, data_file = work / "tokenizer.json", work / "tokens.npz"
    if tok_file.is_file() and data_file.is_file():
        data = np.load(data_file)
        info = json.loads((work / "data.json").read_text())
        return Tokenizer.from_file(str(tok_file)), data["train"], data["held_out"], info
    root = root or stdlib_root()
    train, held = read_split(root)
    tok = train_tokenizer(list(train.values()), vocab_size)

    def stream(texts: dict[str, str]) -> np.ndarray:
        encs = tok.encode_batch(list(texts.values()))  # post-processor puts <s> first
        return np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in encs])

    train_ids, held_ids = stream(train), stream(held)
    info = {
        "stdlib": str(root),
        "train_files": len(train),
        "held_out_files": len(held),
        "train_bytes": sum(len(t.encode()) for t in train.values()),
        "held_out_bytes": sum(len(t.encode()) for t in held.values()),
        "train_tokens": int(train_ids.size),
        "held_out_tokens": int(held_ids.size),
        "held_out_files_list": sorted(held),
    }
    work.mkdir(parents=True, exist_ok=True)
    with atomic_path(data_file) as tmp, open(tmp, "wb") as f:
        np.savez(f, train=train_ids, held_out=held_ids)
    tok.save(str(tok_file))
    write_atomic(work / "data.json", json.dumps(info, indent=1).encode())
    return tok, train_ids, held_ids, info


def windows(stream: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """ids [len(starts), length] cut from the token stream (vectorised gather)."""
    return torch.from_numpy(stream[starts[:, None] + np.arange(length)].astype(np.int64))


def unigram_loss(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats/token) of add-one-smoothed train unigram frequencies on the targets."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts[targets] / counts.sum()).mean())


@torch.no_grad()
def held_out_loss(model: TinyCausalLM, held: np.ndarray, seq_len: int, n: int) -> float:
    starts = np.linspace(0, held.size - seq_len - 2, n).astype(np.int64)
    total = 0.0
    for chunk in np.array_split(starts, max(1, n // 16)):
        ids = windows(held, chunk, seq_len + 1)
        logits = model(ids[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
    return total / (n * seq_len)


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over steps, then cosine over the budget (progress 0..1) down to 10%."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in cfg.items() if k != "arch"}
    if cfg["arch"] == "deepseek_v3":  # MLA keeps every head's latent view: no grouped KV heads
        fields["num_key_value_heads"] = cfg["num_attention_heads"]
    return {
        **ARCH_FIELDS[cfg["arch"]],
        **fields,
        "hidden_act": "silu",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "use_cache": True,
    }


def export_hf(model: TinyCausalLM, tok: Tokenizer, path: Path) -> Path:
    """A Hugging Face model directory (bfloat16 safetensors, config, tokenizer) that transformers loads."""
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float32 if k.endswith(FLOAT32_SUFFIXES) else torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    cfg = hf_config(model.cfg)
    files = {
        "config.json": cfg,
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID},
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "pad_token": SPECIAL_TOKENS[0],
            "model_max_length": cfg["max_position_embeddings"],
        },
    }
    for name, data in files.items():
        write_atomic(path / name, (json.dumps(data, indent=2) + "\n").encode())
    write_atomic(path / "tokenizer.json", tok.to_str().encode())
    return path


def plot_curves(
    log: list[dict[str, float]], evals: list[dict[str, float]], unigram: float, out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [r["tokens"] / 1e6 for r in log]
    ax.plot(tokens, [r["target"] for r in log], lw=0.8, label="target train")
    ax.plot(tokens, [r["draft"] for r in log], lw=0.8, label="draft train (CE)")
    ax.plot(tokens, [r["kl"] for r in log], lw=0.8, label="draft train KL(target || draft)")
    ax.plot([e["tokens"] / 1e6 for e in evals], [e["target"] for e in evals], "o-", label="target held-out")
    ax.plot([e["tokens"] / 1e6 for e in evals], [e["draft"] for e in evals], "s-", label="draft held-out")
    ax.axhline(unigram, color="grey", ls="--", label=f"unigram baseline {unigram:.2f}")
    ax.set(xlabel="training tokens (millions)", ylabel="loss (nats/token)", title="meshserve tiny models")
    ax.set_ylim(0, max(unigram * 1.3, 1))
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def make_optimizers(
    models: dict[str, TinyCausalLM], settings: TrainSettings
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, float]]:
    """AdamW per trained model (the draft alone in a draft_only stage) and its base learning rate."""
    base_lr = {"target": settings.lr_target, "draft": settings.lr_draft}
    names = ("draft",) if settings.draft_only else ("target", "draft")
    opts = {
        k: torch.optim.AdamW(
            models[k].parameters(), lr=base_lr[k], betas=(0.9, 0.95), weight_decay=settings.weight_decay
        )
        for k in names
    }
    return opts, base_lr


def train(
    work: Path,
    export: Path | None,
    settings: TrainSettings,
    resume: bool = False,
    preset: dict[str, Any] | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Train both models (or the draft alone) to the budget; write checkpoints, curves, metrics, HF dirs.

    preset: models.yaml's content (default: the shipped models); root: the corpus (default: the stdlib).
    """
    ckpt = work / "checkpoint.pt"
    require(
        not settings.draft_only or settings.init is not None or (resume and ckpt.is_file()),
        "init",
        "a draft-only stage starts from a run's checkpoint.pt (or resumes its own)",
    )
    torch.set_num_threads(settings.threads)
    preset = preset or load_preset()
    tok, train_ids, held_ids, data_info = prepare_data(work, preset["tokenizer"]["vocab_size"], root)
    vocab = tok.get_vocab_size()
    torch.manual_seed(settings.seed)
    cfgs = {name: {**preset[name], "vocab_size": vocab} for name in ("target", "draft")}
    models = {name: TinyCausalLM(cfg) for name, cfg in cfgs.items()}
    target, draft = models["target"], models["draft"]
    opts, base_lr = make_optimizers(models, settings)
    rng = np.random.default_rng(settings.seed)
    step, elapsed, cpu, log, evals = 0, 0.0, 0.0, [], []
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for k, model in models.items():
            model.load_state_dict(state[k])
        for k in opts:
            opts[k].load_state_dict(state["opt_" + k])
        step, elapsed, log, evals, rng = (state[k] for k in ("step", "elapsed", "log", "evals", "rng"))
        cpu = state.get("cpu_seconds", 0.0)  # checkpoints before CPU time was recorded lack it
    elif settings.draft_only:
        state = torch.load(settings.init, weights_only=False)
        for k, model in models.items():
            model.load_state_dict(state[k])
    if settings.draft_only:
        target.requires_grad_(False).eval()
    budget = settings.minutes * 60
    tokens_per_step = settings.batch_size * settings.seq_len

    def progress() -> float:
        if settings.tokens is not None:
            return step * tokens_per_step / settings.tokens
        return elapsed / budget

    next_eval = len(evals) / 5  # 5 evaluations spread over the budget, plus the final one
    next_ckpt = elapsed + settings.checkpoint_minutes * 60
    unit = f"{settings.minutes} min" if settings.tokens is None else f"{settings.tokens / 1e6:.2f}M tokens"
    print(
        f"target {target.num_parameters() / 1e6:.2f}M params, draft {draft.num_parameters() / 1e6:.2f}M; "
        f"{data_info['train_tokens'] / 1e6:.2f}M train tokens, budget {unit}"
        + (", draft only (target frozen)" if settings.draft_only else ""),
        flush=True,
    )
    bar = tqdm(total=1000, initial=int(1000 * progress()), unit="‰", mininterval=30, desc="train-tiny")
    while progress() < 1 and (settings.max_steps is None or step < settings.max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if progress() >= next_eval:
            evals.append(
                {
                    "tokens": step * tokens_per_step,
                    "elapsed": elapsed,
                    "target": held_out_loss(target, held_ids, settings.seq_len, 16),
                    "draft": held_out_loss(draft, held_ids, settings.seq_len, 16),
                }
            )
            print(
                f"eval @ {step} steps: held-out target {evals[-1]['target']:.3f} "
                f"draft {evals[-1]['draft']:.3f}",
                flush=True,
            )
            next_eval += 1 / 5
        starts = rng.integers(0, train_ids.size - settings.seq_len - 1, settings.batch_size)
        ids = windows(train_ids, starts, settings.seq_len + 1)
        inputs, labels = ids[:, :-1], ids[:, 1:].flatten()
        for k, opt in opts.items():
            for g in opt.param_groups:
                g["lr"] = base_lr[k] * lr_factor(step, progress(), settings.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.autocast_bf16):
            with torch.set_grad_enabled(not settings.draft_only):
                t_logits = target(inputs).flatten(0, 1).float()
                t_ce = F.cross_entropy(t_logits, labels)
                t_loss = t_ce + settings.balance_coef * target.balance_loss()
            d_logits = draft(inputs).flatten(0, 1).float()
            d_ce = F.cross_entropy(d_logits, labels)
            kl = F.kl_div(
                F.log_softmax(d_logits, -1),
                F.log_softmax(t_logits.detach(), -1),
                log_target=True,
                reduction="batchmean",
            )
            d_loss = (1 - settings.distill_weight) * d_ce + settings.distill_weight * kl
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        # The graphs are disjoint (target logits detached in the KL); a frozen target has none.
        (d_loss if settings.draft_only else t_loss + d_loss).backward()
        for k in opts:
            torch.nn.utils.clip_grad_norm_(models[k].parameters(), 1.0)
        for opt in opts.values():
            opt.step()
        if not settings.draft_only:
            target.update_router_bias(settings.bias_update)
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        cpu += time.process_time() - c0
        bar.update(min(int(1000 * progress()), 1000) - bar.n)
        log.append(
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "elapsed": elapsed,
                "target": t_ce.item(),
                "draft": d_ce.item(),
                "kl": kl.item(),
                "tok_s": tokens_per_step / dt,
            }
        )
        if step % 25 == 0:
            recent = log[-25:]
            print(
                f"step {step} {elapsed / 60:.1f} min: "
                + " ".join(f"{k} {np.mean([r[k] for r in recent]):.3f}" for k in ("target", "draft", "kl"))
                + f" {np.median([r['tok_s'] for r in recent]):.0f} tok/s",
                flush=True,
            )
        if elapsed >= next_ckpt or progress() >= 1 or step == settings.max_steps:
            state = {
                **{k: m.state_dict() for k, m in models.items()},
                "step": step,
                "elapsed": elapsed,
                "cpu_seconds": cpu,
                "log": log,
                "evals": evals,
                "rng": rng,
                "settings": asdict(settings),
                **{"opt_" + k: o.state_dict() for k, o in opts.items()},
            }
            with atomic_path(ckpt) as tmp:
                torch.save(state, tmp)
            next_ckpt = elapsed + settings.checkpoint_minutes * 60
    bar.close()
    return finish(
        work,
        export,
        settings,
        tok,
        target,
        draft,
        train_ids,
        held_ids,
        data_info,
        step,
        elapsed,
        cpu,
        log,
        evals,
    )


def finish(
    work: Path,
    export: Path | None,
    settings: TrainSettings,
    tok: Tokenizer,
    target: TinyCausalLM,
    draft: TinyCausalLM,
    train_ids: np.ndarray,
    held_ids: np.ndarray,
    data_info: dict[str, Any],
    step: int,
    elapsed: float,
    cpu: float,
    log: list[dict[str, float]],
    evals: list[dict[str, float]],
) -> dict[str, Any]:
    """Final held-out evaluation beside the unigram baseline, curves, metrics JSON, exported models."""
    n, t = settings.eval_windows, settings.seq_len
    tokens_seen = step * settings.batch_size * t
    evals.append(
        {
            "tokens": tokens_seen,
            "elapsed": elapsed,
            "target": held_out_loss(target, held_ids, t, n),
            "draft": held_out_loss(draft, held_ids, t, n),
        }
    )
    starts = np.linspace(0, held_ids.size - t - 2, n).astype(np.int64)
    targets = held_ids[starts[:, None] + 1 + np.arange(t)].flatten()
    unigram = unigram_loss(train_ids, targets, tok.get_vocab_size())
    metrics = {
        "settings": asdict(settings),
        "data": {k: v for k, v in data_info.items() if k != "held_out_files_list"},
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": elapsed,
        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "cpu_seconds": cpu,  # process CPU time of the training steps, all threads (evaluations excluded)
        "tokens_per_cpu_s": tokens_seen / max(cpu, 1e-9),
        "params": {"target": target.num_parameters(), "draft": draft.num_parameters()},
        "held_out_loss": {"target": evals[-1]["target"], "draft": evals[-1]["draft"], "unigram": unigram},
        "evals": evals,
        "torch": torch.__version__,
    }
    if settings.init is not None and (Path(settings.init).parent / "metrics.json").is_file():
        metrics["init_run"] = json.loads((Path(settings.init).parent / "metrics.json").read_text())
    print(
        f"held-out loss (nats/token, {n} x {t} tokens): target {evals[-1]['target']:.3f}, "
        f"draft {evals[-1]['draft']:.3f}, unigram baseline {unigram:.3f}",
        flush=True,
    )
    print(
        f"{step} steps, {tokens_seen / 1e6:.2f}M tokens seen, {elapsed / 60:.1f} min, "
        f"{metrics['tokens_per_s']:.0f} tokens/s, {cpu / 60:.1f} CPU min "
        f"({'the draft alone' if settings.draft_only else 'both models'} per step)",
        flush=True,
    )
    plot_curves(log, evals, unigram, work / "loss.png")
    write_atomic(work / "metrics.json", json.dumps(metrics, indent=1).encode())
    if export is not None:
        export_hf(target, tok, export / "tiny-moe")
        export_hf(draft, tok, export / "tiny-draft")
        write_atomic(export / "training.json", json.dumps(metrics, indent=1).encode())
        print(f"exported {export / 'tiny-moe'} and {export / 'tiny-draft'}", flush=True)
    return metrics
