"""train-tiny end to end on a toy corpus: a few steps, then the exported models load in meshserve and
in transformers and agree with the training module; the corpus split and tokenizer are deterministic.
The DeepSeek-V3-style target (MLA, grouped noaux_tc routing, a shared expert, layer 0 dense) exports to
transformers' DeepseekV3, and its correction bias moves by the aux-loss-free rule, not by gradients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.training.corpus import is_held_out, read_split, train_tokenizer
from meshserve.training.deepseek import GroupedMoE
from meshserve.training.model import TinyCausalLM
from meshserve.training.train import TrainSettings, train

COMMON = {
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
}
PRESET = {
    "tokenizer": {"vocab_size": 320},
    "target": {
        "arch": "mixtral",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        **COMMON,
    },
    "draft": {
        "arch": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 48,
        **COMMON,
    },
}


def toy_corpus(root):
    """60 small modules of predictable code; the names are such that some are held out."""
    for i in range(60):
        body = "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n\n" for j in range(40))
        (root / f"mod_{i}.py").write_text(f'"""Module {i}."""\n\nimport os\n\n\n{body}')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("never read\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = toy_corpus(tmp_path_factory.mktemp("lib"))
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(
        minutes=10,
        max_steps=8,
        seq_len=32,
        batch_size=4,
        eval_windows=4,
        threads=1,
        warmup_steps=2,
        lr_target=1e-2,
        lr_draft=1e-2,
    )
    metrics = train(out / "work", out / "models", settings, preset=PRESET, root=root)
    return metrics, out


def test_split_is_by_path_and_skips_site_packages(tmp_path):
    train_files, held = read_split(toy_corpus(tmp_path))
    assert set(held) == {f"mod_{i}.py" for i in range(60) if is_held_out(f"mod_{i}.py")}
    assert held and len(train_files) + len(held) == 60


def test_tokenizer_round_trips_code_and_puts_bos_first():
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 20, 300)
    enc = tok.encode("def g(y):\n    return y\n")
    assert enc.ids[0] == 1
    assert tok.decode(enc.ids) == "def g(y):\n    return y\n"


def test_a_few_steps_lower_the_held_out_loss_and_export_both_models(trained):
    metrics, out = trained
    assert metrics["steps"] == 8
    first, last = metrics["evals"][0], metrics["evals"][-1]
    assert last["target"] < first["target"] and last["draft"] < first["draft"]
    assert (out / "work" / "loss.png").stat().st_size > 0
    saved = json.loads((out / "models" / "training.json").read_text())
    assert saved["tokens_seen"] == 8 * 4 * 32
    for name in ("tiny-moe", "tiny-draft"):
        assert {p.name for p in (out / "models" / name).iterdir()} >= {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        }


@pytest.mark.parametrize("name,role", [("tiny-moe", "target"), ("tiny-draft", "draft")])
def test_exported_weights_give_the_training_modules_logits_in_transformers_and_meshserve(trained, name, role):
    _, out = trained
    path = out / "models" / name
    module = TinyCausalLM({**PRESET[role], "vocab_size": 320})
    module.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, module(ids), rtol=1e-4, atol=1e-4)
        greedy = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    with LLM(str(path)) as llm:
        (got,) = llm.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert got.token_ids == greedy


def test_a_token_budget_sets_the_steps_and_a_draft_only_stage_trains_the_draft_alone(trained, tmp_path):
    _, out = trained
    work = tmp_path / "stage"
    work.mkdir()
    for name in ("tokenizer.json", "tokens.npz", "data.json"):  # the same token cache, as the docs do
        (work / name).write_bytes((out / "work" / name).read_bytes())
    init = out / "work" / "checkpoint.pt"
    settings = TrainSettings(
        tokens=5 * 4 * 32,
        seq_len=32,
        batch_size=4,
        eval_windows=4,
        threads=1,
        warmup_steps=2,
        lr_draft=1e-2,
        distill_weight=1.0,
        draft_only=True,
        init=str(init),
    )
    metrics = train(work, None, settings, preset=PRESET)
    assert metrics["steps"] == 5 and metrics["tokens_seen"] == 5 * 4 * 32
    assert metrics["cpu_seconds"] > 0 and metrics["init_run"]["steps"] == 8
    before = torch.load(init, weights_only=False)
    after = torch.load(work / "checkpoint.pt", weights_only=False)
    assert "opt_target" not in after
    assert all(torch.equal(v, after["target"][k]) for k, v in before["target"].items())
    assert any(not torch.equal(v, after["draft"][k]) for k, v in before["draft"].items())


def test_draft_only_without_a_checkpoint_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="init"):
        train(tmp_path, None, TrainSettings(draft_only=True, max_steps=1, threads=1), preset=PRESET)
    with pytest.raises(InputError, match="init"):  # nothing to resume either
        train(
            tmp_path, None, TrainSettings(draft_only=True, max_steps=1, threads=1), resume=True, preset=PRESET
        )


DEEPSEEK = {
    "arch": "deepseek_v3",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "first_k_dense_replace": 1,
    "intermediate_size": 48,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    **COMMON,
}
BIAS = "mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def trained_deepseek(tmp_path_factory):
    root = toy_corpus(tmp_path_factory.mktemp("lib"))
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(
        minutes=10,
        max_steps=6,
        seq_len=32,
        batch_size=4,
        eval_windows=4,
        threads=1,
        warmup_steps=2,
        lr_target=1e-2,
        lr_draft=1e-2,
        bias_update=1e-2,
    )
    metrics = train(out / "work", out / "models", settings, preset={**PRESET, "target": DEEPSEEK}, root=root)
    return metrics, out


def test_the_export_is_deepseek_v3_with_float32_router_and_a_moved_bias(trained_deepseek):
    metrics, out = trained_deepseek
    path = out / "models" / "tiny-moe"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["topk_method"] == "noaux_tc"
    assert cfg["q_lora_rank"] is None and cfg["num_key_value_heads"] == 2
    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert f"model.layers.0.{BIAS}" not in dtypes  # layer 0 is dense
    assert dtypes[f"model.layers.1.{BIAS}"] == dtypes["model.layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.experts.7.down_proj.weight"] == "BF16"
    bias = load_file(path / "model.safetensors")[f"model.layers.2.{BIAS}"]
    # 6 steps of +-0.01 each: every entry an even multiple of the step, at most 6 of them, not all zero
    steps = bias / 1e-2
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 6 and steps.any()
    assert metrics["steps"] == 6


def test_the_bias_rule_raises_the_underloaded_experts():
    moe = GroupedMoE({**DEEPSEEK, "vocab_size": 320})
    moe.load = torch.tensor([10.0, 0, 2, 4, 4, 4, 4, 4])  # mean 4
    moe.update_bias(0.5)
    assert moe.gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0, 0, 0, 0, 0]


def test_a_deepseek_export_gives_the_training_modules_logits_in_transformers_and_meshserve(trained_deepseek):
    _, out = trained_deepseek
    path = out / "models" / "tiny-moe"
    module = TinyCausalLM({**DEEPSEEK, "vocab_size": 320})
    module.load_state_dict({k: v.float() for k, v in load_file(path / "model.safetensors").items()})
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, module(ids), rtol=1e-4, atol=1e-4)
        greedy = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    with LLM(str(path), dtype="float32") as llm:
        (got,) = llm.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert got.token_ids == greedy


def test_train_tiny_presets_the_shipped_shapes_and_refuses_a_missing_file(tmp_path, monkeypatch, capsys):
    import sys

    from meshserve.cli import main
    from meshserve.training.train import PRESET, load_preset

    assert load_preset()["target"]["arch"] == "deepseek_v3"  # the shipped pair
    assert load_preset(PRESET.with_name("models-mixtral.yaml"))["target"]["num_local_experts"] == 8
    missing = str(tmp_path / "nope.yaml")
    argv = ["meshserve", "train-tiny", "--preset", missing, "--work", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "preset" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["0", "-1024"])
def test_train_tiny_refuses_a_token_budget_that_is_not_positive(tokens, tmp_path, monkeypatch, capsys):
    import sys

    from meshserve.cli import main

    monkeypatch.setattr(sys, "argv", ["meshserve", "train-tiny", "--tokens", tokens, "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and f"tokens: must be > 0, got {tokens}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before the token cache is built
