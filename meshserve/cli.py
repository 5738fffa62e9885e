"""The `meshserve` command: one Typer app; each subcommand is a thin door over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from meshserve import __version__
from meshserve.atomic import check_writable
from meshserve.bench.cli import app as bench_app
from meshserve.errors import InputError
from meshserve.wafer.cli import app as wafer_app

app = typer.Typer(
    help="meshserve: serve MoE/dense LLMs and plan expert-parallel deployment on wafer-scale chips.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(wafer_app, name="wafer", help="Wafer-scale MoE simulator and planner (MoEntwine).")
app.add_typer(bench_app, name="bench", help="Benchmarks of a running server (HTTP only).")


def _print_version(value: bool) -> None:
    if value:
        print(f"meshserve {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """meshserve: serve MoE/dense LLMs and plan expert-parallel deployment on wafer-scale chips."""


@app.command()
def env() -> None:
    """The environment switches (value, default, what each does) and the kernel paths they choose here:
    paste it into a bug report."""
    import torch

    from meshserve import switches
    from meshserve.kernels.paths import kernel_paths

    print(f"meshserve {__version__} / torch {torch.__version__}")
    print("switches (read once at engine start; meshserve/switches.py):")
    values = switches.refresh()
    for s in switches.SWITCHES:
        shown = ("(set)" if s.secret else values[s.name]) if values[s.name] else "(unset)"
        print(f"  {s.name}={shown}  [default {s.default or 'unset'}]  {s.help}")
    for name, help_text in switches.FOREIGN.items():
        print(f"  {name}={os.environ.get(name, '(unset)')}  {help_text}")
    print("kernel paths:")
    for op, path in kernel_paths().items():
        print(f"  {op}: {path}")


@app.command()
def demo(out: str = typer.Option("out", help="Folder for plots and JSON results.")) -> None:
    """The main job on the embedded defaults: the wafer communication comparison, with plots."""
    check_writable(out, "out", folder=True)
    from meshserve.demo import run_demo

    run_demo(out)


# Data / expert parallelism, shared by generate and serve (vLLM's flag names).
DATA_PARALLEL_SIZE = typer.Option(1, help="Rank processes (data-parallel attention).")
ENABLE_EXPERT_PARALLEL = typer.Option(False, help="Split MoE experts over the ranks.")
ENABLE_EPLB = typer.Option(False, help="Rebalance experts live from the ranks' expert loads.")
OVERSUBSCRIBE = typer.Option(False, help="Start more rank processes than this machine has cores.")
MODEL_HELP = "Hugging Face-format model directory, or an Org/Name id in the local Hugging Face cache."
REVISION = typer.Option(None, help="Snapshot of a cached model id: branch, tag or commit (default: main).")
DTYPE = typer.Option("auto", help="auto (the checkpoint's torch_dtype), float32, bfloat16 or float16.")
QUANTIZATION = typer.Option(
    None,
    help="Weight-only quantization: gptq, awq, compressed-tensors (the checkpoint's format), int8 or int4 "
    "(made while a float checkpoint loads); default: the checkpoint's quantization_config, else none.",
)
QUANTIZE_LM_HEAD = typer.Option(
    None,
    "--quantize-lm-head/--no-quantize-lm-head",
    help="Quantize the lm_head too (default: yes for int8 / int4, as the checkpoint stores it for gptq, "
    "no for awq and compressed-tensors); a tied input embedding reads the same quantized rows.",
)
DEVICE = typer.Option("cpu", help="cpu (native kernels) or cuda (torch reference kernels, NCCL).")
EPLB_CONFIG = typer.Option(
    None,
    help="JSON: window_size, step_interval, num_redundant_experts, balancer (greedy|topology|ni), "
    'mode (invasive|non-invasive), e.g. \'{"num_redundant_experts": 2, "balancer": "greedy"}\'.',
)


def _parallel_args(
    data_parallel_size: int,
    enable_expert_parallel: bool,
    enable_eplb: bool,
    eplb_config: str | None,
    oversubscribe: bool = False,
) -> dict:
    return {
        "data_parallel_size": data_parallel_size,
        "oversubscribe": oversubscribe,
        "enable_expert_parallel": enable_expert_parallel,
        "enable_eplb": enable_eplb,
        "eplb_config": _json_option("eplb_config", eplb_config) or {},
    }


@app.command()
def generate(
    model: str = typer.Option(..., help=MODEL_HELP),
    revision: str | None = REVISION,
    prompt: str | None = typer.Option(None, help="Prompt text ('-' reads it from stdin)."),
    prompt_file: str | None = typer.Option(
        None, help="File with one prompt per line ('-' = stdin); completions are printed in order."
    ),
    max_tokens: int = typer.Option(64, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = all)."),
    seed: int | None = typer.Option(None, help="Seed for this request's sampling."),
    stop: list[str] | None = typer.Option(None, help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, help="Keep generating past the EOS token."),
    dtype: str = DTYPE,
    quantization: str | None = QUANTIZATION,
    quantize_lm_head: bool | None = QUANTIZE_LM_HEAD,
    max_model_len: int | None = typer.Option(None, help="Longest prompt + output (default: the model's)."),
    speculative_config: str | None = typer.Option(
        None,
        help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' or '
        '\'{"method": "draft_model", "model": DIR}\' or \'{"method": "mtp"}\' (DeepSeek-V3 MTP layer).',
    ),
    enable_prefix_caching: bool = typer.Option(True, help="Automatic prefix caching."),
    data_parallel_size: int = DATA_PARALLEL_SIZE,
    enable_expert_parallel: bool = ENABLE_EXPERT_PARALLEL,
    enable_eplb: bool = ENABLE_EPLB,
    eplb_config: str | None = EPLB_CONFIG,
    oversubscribe: bool = OVERSUBSCRIBE,
    device: str = DEVICE,
) -> None:
    """Complete prompts with a local model and print the completions."""
    from meshserve.engine import LLM, SamplingParams

    prompts = _read_prompts(prompt, prompt_file)
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        seed=seed,
        stop=stop or None,
        ignore_eos=ignore_eos,
    )
    spec = _json_option("speculative_config", speculative_config)
    with LLM(
        model,
        dtype=dtype,
        quantization=quantization,
        quantize_lm_head=quantize_lm_head,
        revision=revision,
        max_model_len=max_model_len,
        max_num_seqs=min(len(prompts), 128),
        speculative_config=spec,
        enable_prefix_caching=enable_prefix_caching,
        device=device,
        **_parallel_args(data_parallel_size, enable_expert_parallel, enable_eplb, eplb_config, oversubscribe),
    ) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)  # it bounds what is in the engine at once
    for out in outputs:
        print(out.text)


def _read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt TEXT, --prompt - (stdin as one prompt), or --prompt-file FILE|- (one prompt per line)."""
    if (prompt is None) == (prompt_file is None):
        raise InputError("prompt", "give exactly one of --prompt TEXT and --prompt-file FILE ('-' = stdin)")
    if prompt is not None:
        return [sys.stdin.read() if prompt == "-" else prompt]
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError("prompt_file", f"cannot read {prompt_file} ({err})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("prompt_file", f"{prompt_file} holds no prompt (one prompt per non-empty line)")
    return prompts


def _json_option(name: str, text: str | None) -> dict | None:
    import json

    try:
        value = None if text is None else json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(name, f"must be a JSON object ({err})") from None
    if value is not None and not isinstance(value, dict):
        raise InputError(name, "must be a JSON object")
    return value


@app.command()
def profile(
    model: str = typer.Option(..., help="Model directory whose linear shapes are profiled."),
    out: str | None = typer.Option(
        None,
        help="Table to write (default: this machine's cache file, "
        "~/.cache/meshserve/profiles/gemm-<isa>-<threads>t.json; docs/gemm.md).",
    ),
    dtype: list[str] = typer.Option(["float32", "bfloat16"], help="dtypes to profile (repeatable)."),
    max_tokens: int = typer.Option(512, help="Largest M: the engine's max_num_batched_tokens."),
    reps: int = typer.Option(7, help="Timed runs per candidate (the median counts)."),
    num_threads: int | None = typer.Option(None, help="torch threads (default: all usable cores)."),
) -> None:
    """Offline kernel profiling for this machine and the model's shapes (a few minutes)."""
    from meshserve.engine.kernel_profile import run_profile

    run_profile(model, out, dtype, max_tokens, reps, num_threads)


@app.command()
def serve(
    model: str = typer.Option(..., help=MODEL_HELP),
    revision: str | None = REVISION,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_model_name: str | None = typer.Option(None, help="Model name in the API (default: --model)."),
    dtype: str = DTYPE,
    quantization: str | None = QUANTIZATION,
    quantize_lm_head: bool | None = QUANTIZE_LM_HEAD,
    max_model_len: int | None = typer.Option(None, help="Longest prompt + output (default: the model's)."),
    max_num_seqs: int | None = typer.Option(None, help="Requests running at once."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per engine step."),
    tpot_target_ms: float | None = typer.Option(
        None, help="Keep each step (the time between tokens) under this: the step's token budget adapts."
    ),
    block_size: int = typer.Option(16, help="Tokens per KV block."),
    kv_cache_memory: float | None = typer.Option(None, help="GiB for the KV cache (default: derived)."),
    enable_prefix_caching: bool = typer.Option(True, help="Automatic prefix caching."),
    speculative_config: str | None = typer.Option(
        None, help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\'.'
    ),
    seed: int = typer.Option(0, help="Seed of the engine's shared generator (unseeded requests)."),
    max_waiting_requests: int | None = typer.Option(1024, help="Waiting queue bound; past it: 503."),
    max_connections: int = typer.Option(1024, help="Open connections served at once; past it: 503."),
    uvicorn_log_level: str = typer.Option("info", help="uvicorn's log level."),
    graceful_shutdown_s: float = typer.Option(
        10.0, help="On SIGTERM, seconds open requests may finish; then each ends with an error event."
    ),
    data_parallel_size: int = DATA_PARALLEL_SIZE,
    enable_expert_parallel: bool = ENABLE_EXPERT_PARALLEL,
    enable_eplb: bool = ENABLE_EPLB,
    eplb_config: str | None = EPLB_CONFIG,
    oversubscribe: bool = OVERSUBSCRIBE,
    device: str = DEVICE,
    tool_call_parser: str | None = typer.Option(
        None, help="How tool calls are read from text under tool_choice auto: hermes, llama3_json, mistral."
    ),
    api_key: str | None = typer.Option(
        None, help="Clients must send 'Authorization: Bearer KEY' to /v1 routes (else MESHSERVE_API_KEY)."
    ),
    task: str = typer.Option(
        "auto", help="generate, embed (/v1/embeddings only), or auto: embed for an embedding checkpoint."
    ),
    num_threads: int | None = typer.Option(None, help="torch threads (default: all usable cores)."),
    trace_file: str | None = typer.Option(
        None, help="Write each step's and request's timeline here (JSON lines; benchmarks/serve_phases.py)."
    ),
    pd: str | None = typer.Option(
        None,
        help="Prefill/decode disaggregation: 'prefill=N,decode=M' starts N prefill and M decode processes "
        "(cores split) behind this endpoint, KV moved over torch.distributed (docs/disaggregation.md).",
    ),
    role: str = typer.Option(
        "mixed",
        help="mixed (this endpoint), or prefill / decode: run one instance of a pair (no HTTP) for a "
        "front end started with --pd-connect; needs --kv-rendezvous, --listen and a key.",
    ),
    kv_rendezvous: str = typer.Option(
        "tcp://127.0.0.1:29600", help="--role: where the pair's KV link meets (the prefill side hosts it)."
    ),
    listen: str = typer.Option("127.0.0.1:29700", help="--role: HOST:PORT the front end connects to."),
    pd_connect: str | None = typer.Option(
        None, help="Serve over instances started with --role: 'prefill=HOST:PORT,decode=HOST:PORT'."
    ),
    transfer_timeout_s: float = typer.Option(30.0, help="--role: one KV transfer's waits, in seconds."),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models,
    /tokenize, /detokenize, /metrics)."""
    from meshserve.server.serve import serve as run

    if role != "mixed":  # one instance of a prefill/decode pair, for a --pd-connect front end
        from meshserve import switches
        from meshserve.engine.pd.remote import run_role

        key = api_key or switches.value("MESHSERVE_API_KEY") or None
        args = {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "block_size": block_size}
        run_role(
            model,
            role,
            kv_rendezvous,
            listen,
            key,
            transfer_timeout_s,
            dtype=dtype,
            revision=revision,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            num_threads=num_threads,
            speculative_config=_json_option("speculative_config", speculative_config),
            **{k: v for k, v in args.items() if v is not None},
        )
        return
    run(
        model,
        api_key=api_key,
        task=task,
        host=host,
        port=port,
        served_model_name=served_model_name,
        max_waiting=max_waiting_requests,
        log_level=uvicorn_log_level,
        graceful_shutdown_s=graceful_shutdown_s,
        max_connections=max_connections,
        tool_call_parser=tool_call_parser,
        trace_file=trace_file,
        num_threads=num_threads,
        dtype=dtype,
        quantization=quantization,
        quantize_lm_head=quantize_lm_head,
        revision=revision,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        tpot_target_ms=tpot_target_ms,
        block_size=block_size,
        kv_cache_memory=kv_cache_memory,
        enable_prefix_caching=enable_prefix_caching,
        seed=seed,
        device=device,
        speculative_config=_json_option("speculative_config", speculative_config),
        **_parallel_args(data_parallel_size, enable_expert_parallel, enable_eplb, eplb_config, oversubscribe),
        **({} if pd is None else {"pd": pd}),
        pd_connect=pd_connect,
    )


@app.command("train-tiny")
def train_tiny(
    minutes: float = typer.Option(45.0, help="Training time budget (both models together)."),
    tokens: int | None = typer.Option(
        None,
        help="Token budget instead of --minutes: the learning-rate "
        "cosine and the stop follow tokens seen, on any machine.",
    ),
    work: str = typer.Option("out/train-tiny", help="Folder: token cache, checkpoint, curves, metrics."),
    export: str | None = typer.Option(
        None,
        help="Write the Hugging Face model directories here (meshserve/assets/models for the shipped ones).",
    ),
    seed: int = typer.Option(0, help="Seed for initialisation and batch sampling."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    batch_size: int = typer.Option(4, help="Sequences per step."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (faster only on CPUs with bf16 matmul)."),
    resume: bool = typer.Option(False, help="Continue from WORK/checkpoint.pt."),
    draft_only: bool = typer.Option(False, help="Distil the draft alone against --init's frozen target."),
    init: str | None = typer.Option(None, help="checkpoint.pt of a run whose weights start --draft-only."),
    lr_draft: float = typer.Option(4e-3, help="Peak learning rate of the draft."),
    distill_weight: float = typer.Option(
        0.5, help="Draft loss: this x KL(target || draft) + the rest x cross-entropy on the data."
    ),
    preset: str | None = typer.Option(
        None,
        help="Model shapes (a models.yaml-style file); default meshserve/training/models.yaml, the shipped "
        "DeepSeek-style pair (models-mixtral.yaml beside it: the previous release's).",
    ),
) -> None:
    """Train the shipped tiny MoE target and dense draft on the Python standard library's sources."""
    from pathlib import Path

    from meshserve.errors import require
    from meshserve.training.train import TrainSettings, load_preset, train

    require(minutes > 0, "minutes", f"must be > 0, got {minutes}")
    require(tokens is None or tokens > 0, "tokens", f"must be > 0, got {tokens}")
    require(0 <= distill_weight <= 1, "distill_weight", f"must be in [0, 1], got {distill_weight}")
    require(lr_draft > 0, "lr_draft", f"must be > 0, got {lr_draft}")
    require(
        not draft_only or resume or (init is not None and Path(init).is_file()),
        "init",
        f"--draft-only needs an existing checkpoint.pt, got {init}",
    )
    require(init is None or Path(init).is_file(), "init", f"no such checkpoint: {init}")
    require(preset is None or Path(preset).is_file(), "preset", f"no such file: {preset}")
    require(threads >= 1, "threads", f"must be >= 1, got {threads}")
    require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    require(8 <= seq_len <= 512, "seq_len", f"must be in [8, 512] (max_position_embeddings), got {seq_len}")
    settings = TrainSettings(
        minutes=minutes,
        tokens=tokens,
        seed=seed,
        threads=threads,
        batch_size=batch_size,
        seq_len=seq_len,
        autocast_bf16=bf16,
        draft_only=draft_only,
        init=init,
        lr_draft=lr_draft,
        distill_weight=distill_weight,
    )
    shapes = load_preset(Path(preset)) if preset else None
    train(Path(work), Path(export) if export else None, settings, resume=resume, preset=shapes)


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
