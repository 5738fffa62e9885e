"""`meshserve bench serve` against the real server: vLLM's keys, counts that add up, bad options refused."""

from __future__ import annotations

import json

import pytest

from meshserve import cli
from meshserve.bench.serve import parse_goodput
from meshserve.errors import InputError

KEYS = [
    "completed",
    "failed",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
] + [f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")]


@pytest.mark.parametrize("dataset", ["random", "prefix-repetition"])
def test_bench_serve_writes_vllm_keys(server, tmp_path, monkeypatch, capsys, dataset):
    out = tmp_path / "result.json"
    monkeypatch.setattr(
        "sys.argv",
        [
            "meshserve",
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--model",
            server.model,
            "--dataset",
            dataset,
            "--num-prompts",
            "8",
            "--request-rate",
            "50",
            "--random-input-len",
            "12",
            "--random-output-len",
            "5",
            "--prefix-len",
            "8",
            "--suffix-len",
            "4",
            "--goodput",
            "ttft:60000",
            "--goodput",
            "tpot:60000",
            "--save-result",
            str(out),
        ],
    )
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    result = json.loads(out.read_text())
    assert all(k in result for k in KEYS)
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (8, 0, 40)
    assert result["total_input_tokens"] == 8 * 12 and result["request_goodput"] > 0
    assert result["mean_ttft_ms"] > 0 and result["p99_e2el_ms"] >= result["median_e2el_ms"]
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_bench_options_are_checked(monkeypatch, capsys):
    with pytest.raises(InputError) as err:
        parse_goodput(["latency:5"])
    assert "goodput" in str(err.value)
    monkeypatch.setattr("sys.argv", ["meshserve", "bench", "serve", "--model", "m", "--dataset", "nope"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2 and "dataset" in capsys.readouterr().err
