"""The `meshserve` command: one Typer app; each subcommand is a thin door over the library."""

from __future__ import annotations

import sys

import typer

from meshserve.errors import InputError
from meshserve.wafer.cli import app as wafer_app

app = typer.Typer(
    help="meshserve: serve MoE/dense LLMs and plan expert-parallel deployment on wafer-scale chips.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(wafer_app, name="wafer", help="Wafer-scale MoE simulator and planner (MoEntwine).")


@app.command()
def demo(out: str = typer.Option("out", help="Folder for plots and JSON results.")) -> None:
    """The main job on the embedded defaults: the wafer communication comparison, with plots."""
    from meshserve.demo import run_demo

    run_demo(out)


@app.command()
def generate(
    model: str = typer.Option(..., help="Hugging Face-format model directory."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_tokens: int = typer.Option(64, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = all)."),
    seed: int | None = typer.Option(None, help="Seed for this request's sampling."),
    stop: list[str] | None = typer.Option(None, help="Stop string (repeatable)."),
    ignore_eos: bool = typer.Option(False, help="Keep generating past the EOS token."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    max_model_len: int | None = typer.Option(None, help="Longest prompt + output (default: the model's)."),
    speculative_config: str | None = typer.Option(
        None, help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' or '
                   '\'{"method": "draft_model", "model": DIR}\'.'),
    enable_prefix_caching: bool = typer.Option(True, help="Automatic prefix caching."),
) -> None:
    """Complete one prompt with a local model and print the completion."""
    import json

    from meshserve.engine import LLM, SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                            seed=seed, stop=stop or None, ignore_eos=ignore_eos)
    try:
        spec = None if speculative_config is None else json.loads(speculative_config)
    except json.JSONDecodeError as err:
        raise InputError("speculative_config", f"must be a JSON object ({err})") from None
    with LLM(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=1, speculative_config=spec,
             enable_prefix_caching=enable_prefix_caching) as llm:
        (out,) = llm.generate(prompt, params, use_tqdm=False)
    print(out.text)


@app.command("train-tiny")
def train_tiny(
    minutes: float = typer.Option(45.0, help="Training time budget (both models together)."),
    work: str = typer.Option("out/train-tiny", help="Folder: token cache, checkpoint, curves, metrics."),
    export: str | None = typer.Option(None, help="Write the Hugging Face model directories here "
                                                 "(meshserve/assets/models for the shipped ones)."),
    seed: int = typer.Option(0, help="Seed for initialisation and batch sampling."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    batch_size: int = typer.Option(4, help="Sequences per step."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (faster only on CPUs with bf16 matmul)."),
    resume: bool = typer.Option(False, help="Continue from WORK/checkpoint.pt."),
) -> None:
    """Train the shipped tiny MoE target and dense draft on the Python standard library's sources."""
    from pathlib import Path

    from meshserve.errors import require
    from meshserve.training.train import TrainSettings, train

    require(minutes > 0, "minutes", f"must be > 0, got {minutes}")
    require(threads >= 1, "threads", f"must be >= 1, got {threads}")
    require(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
    require(8 <= seq_len <= 512, "seq_len", f"must be in [8, 512] (max_position_embeddings), got {seq_len}")
    settings = TrainSettings(minutes=minutes, seed=seed, threads=threads, batch_size=batch_size,
                             seq_len=seq_len, autocast_bf16=bf16)
    train(Path(work), Path(export) if export else None, settings, resume=resume)


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
