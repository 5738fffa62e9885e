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


@app.command()
def profile(
    model: str = typer.Option(..., help="Model directory whose linear shapes are profiled."),
    out: str | None = typer.Option(None, help="Table to write (default: $MESHSERVE_PROFILE_DIR/gemm.json "
                                              "or ~/.cache/meshserve/profiles/gemm.json)."),
    dtype: list[str] = typer.Option(["float32", "bfloat16"], help="dtypes to profile (repeatable)."),
    max_tokens: int = typer.Option(512, help="Largest M: the engine's max_num_batched_tokens."),
    reps: int = typer.Option(7, help="Timed runs per candidate (the median counts)."),
    num_threads: int | None = typer.Option(None, help="torch threads (default: all usable cores)."),
) -> None:
    """Offline kernel profiling for this machine and the model's shapes (a few minutes)."""
    from meshserve.kernels.profile import run_profile

    run_profile(model, out, dtype, max_tokens, reps, num_threads)


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
