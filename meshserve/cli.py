"""The `meshserve` command: one Typer app; each subcommand is a thin door over the library."""

from __future__ import annotations

import sys

import typer

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
def serve(
    model: str = typer.Option(..., help="Hugging Face-format model directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_model_name: str | None = typer.Option(None, help="Model name in the API (default: --model)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    max_model_len: int | None = typer.Option(None, help="Longest prompt + output (default: the model's)."),
    max_num_seqs: int | None = typer.Option(None, help="Requests running at once."),
    max_num_batched_tokens: int = typer.Option(2048, help="Tokens per engine step."),
    block_size: int = typer.Option(16, help="Tokens per KV block."),
    kv_cache_memory: float | None = typer.Option(None, help="GiB for the KV cache (default: derived)."),
    enable_prefix_caching: bool = typer.Option(True, help="Automatic prefix caching."),
    speculative_config: str | None = typer.Option(None, help='JSON, e.g. \'{"method": "ngram", '
                                                             '"num_speculative_tokens": 3}\'.'),
    seed: int = typer.Option(0, help="Seed of the engine's shared generator (unseeded requests)."),
    max_waiting_requests: int | None = typer.Option(1024, help="Waiting queue bound; past it: 503."),
    uvicorn_log_level: str = typer.Option("info", help="uvicorn's log level."),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /metrics)."""
    from meshserve.server.serve import serve as run

    run(model, host=host, port=port, served_model_name=served_model_name, max_waiting=max_waiting_requests,
        log_level=uvicorn_log_level, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, kv_cache_memory=kv_cache_memory,
        enable_prefix_caching=enable_prefix_caching, seed=seed,
        speculative_config=_json_option(speculative_config, "speculative_config"))


def _json_option(text: str | None, name: str) -> dict | None:
    import json

    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(name, f"must be a JSON object ({err})") from None


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
