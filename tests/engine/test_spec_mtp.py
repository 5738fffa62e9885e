"""DeepSeek-V3's MTP layer as the speculative draft: greedy output is the target's own, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.traces import ExpertTrace

SETTINGS = {"block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 4}
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def batch() -> list[list[int]]:
    """Prompt lengths 1 to 33, two sharing a 17-token prefix (the prefix cache skips the target's rows)."""
    gen = torch.Generator().manual_seed(3)
    shared = [1] + torch.randint(3, 512, (16,), generator=gen).tolist()
    return [shared + [7, 8], [1], [1, *range(40, 48)], [1, *range(60, 92)], shared + [9]]


def copying_mtp(path, out):
    """The checkpoint at `path` with its MTP layer made to repeat the target's guess at the row before: the
    block's outputs zeroed (attention and MLP add nothing), eh_proj passing hnorm(h) alone, unit norms; so
    its logits are the target's at that row and its drafts are accepted wherever the target repeats."""
    config = json.loads((path / "config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    tensors = load_file(path / "model.safetensors")
    hidden = config["hidden_size"]
    for name, t in tensors.items():
        if name.startswith(mtp) and name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(t)
    eh = torch.cat((torch.zeros(hidden, hidden), torch.eye(hidden)), dim=1)
    tensors[mtp + "eh_proj.weight"] = eh.to(tensors[mtp + "eh_proj.weight"].dtype)
    for norm in ("hnorm", "shared_head.norm"):
        tensors[f"{mtp}{norm}.weight"] = torch.ones_like(tensors[f"{mtp}{norm}.weight"])
    out.mkdir()
    for file in path.iterdir():
        if file.name != "model.safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def generate(path, rounds: int = 1, **settings) -> tuple[list[list[list[int]]], LLM]:
    llm = LLM(str(path), **SETTINGS, **settings)
    return [[o.token_ids for o in llm.generate(batch(), PARAMS, use_tqdm=False)] for _ in range(rounds)], llm


@pytest.mark.parametrize("weights", ["random", "copying"])
def test_mtp_drafts_leave_greedy_output_unchanged(weights, tiny_model_dir, tmp_path):
    """Twice through the engine with the prefix cache on (the second round's hits start the MTP context
    after the cached tokens). The copying layer's drafts are accepted where the target repeats a token."""
    path = tiny_model_dir("deepseek_v3", num_nextn_predict_layers=1)
    if weights == "copying":
        path = copying_mtp(path, tmp_path / "copying")
    plain = generate(path)[0][0]
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    outs, llm = generate(path, 2, enable_prefix_caching=True, speculative_config=spec)
    assert outs == [plain, plain]
    stats = llm.engine.spec.stats()
    print(f"MTP draft ({weights} weights), k=3: acceptance {stats['spec_acceptance_rate']:.3f}")
    assert llm.engine.spec.draft_tokens > 0
    if weights == "copying":  # random weights accept none: here verify keeps some of the MTP's drafts
        assert llm.engine.spec.accepted_tokens > 0


def test_mtp_moe_routing_is_recorded_as_a_draft_layer(tiny_model_dir, tmp_path):
    """The MTP layer's MoE routes every row the proposer feeds it: the expert trace records those as one
    more layer after the main ones, flagged as a draft layer; the main layers hold the served tokens."""
    path = tiny_model_dir("deepseek_v3", num_nextn_predict_layers=1)
    trace_file = tmp_path / "trace.npz"
    spec = {"method": "mtp", "num_speculative_tokens": 3}
    with LLM(str(path), **SETTINGS, speculative_config=spec, record_expert_trace=str(trace_file)) as llm:
        mtp, rows = llm.engine.model.mtp, []
        predict = mtp.predict
        mtp.predict = lambda embeds, *rest: rows.append(len(embeds)) or predict(embeds, *rest)
        llm.generate(batch(), PARAMS, use_tqdm=False)
        main_layers = llm.engine.model_config.num_moe_layers
    trace = ExpertTrace.load(trace_file)
    assert trace.draft_layers == 1 and trace.num_layers == main_layers + 1
    assert trace.counts[:, -1].sum() == trace.top_k * sum(rows) > 0  # every MTP row, each step's once
    main = trace.target().counts
    assert (main.sum(axis=2) == trace.top_k * trace.tokens_per_step()[:, None]).all()


def test_mtp_needs_an_mtp_layer(tiny_model_dir):
    with pytest.raises(InputError) as err:
        LLM(str(tiny_model_dir("deepseek_v3")), speculative_config={"method": "mtp"})
    assert err.value.field == "speculative_config.method" and "num_nextn_predict_layers" in str(err.value)


def reference_mtp_logits(path, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's final-normed hidden rows and the MTP layer's logits at every row of `tokens` but the
    last, from transformers' modules: the MTP block as transformers' own decoder layer num_hidden_layers (a
    copy of the checkpoint that counts one layer more loads it, experts and all)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    layers, eps = config["num_hidden_layers"], config["rms_norm_eps"]
    target = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    longer = path.parent / f"{path.name}_mtp_as_layer"
    if not longer.exists():
        longer.mkdir()
        for file in path.iterdir():
            (longer / file.name).write_bytes(file.read_bytes())
        (longer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers + 1}))
    block = AutoModelForCausalLM.from_pretrained(longer, attn_implementation="eager", dtype=torch.float32)
    block = block.model.layers[layers]
    weights = load_file(path / "model.safetensors")

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        w = weights[f"model.layers.{layers}.{name}.weight"].float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ids = torch.tensor([tokens])
    with torch.no_grad():
        hidden = target.model(ids).last_hidden_state[0, :-1]
        embeds = target.model.embed_tokens(ids[0, 1:])
        both = torch.cat((norm(embeds, "enorm"), norm(hidden, "hnorm")), dim=-1)
        x = (both @ weights[f"model.layers.{layers}.eh_proj.weight"].float().T)[None]
        positions = torch.arange(len(tokens) - 1)[None]
        mask = torch.full((len(tokens) - 1,) * 2, float("-inf")).triu(1)[None, None]
        rope = target.model.rotary_emb(x, positions)
        x = block(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        x = x[0] if isinstance(x, tuple) else x
        return hidden, target.lm_head(norm(x[0], "shared_head.norm"))


def test_mtp_logits_match_transformers_modules_as_rows_arrive(tiny_model_dir):
    """Given transformers' target rows, the proposer's first-draft logits, its KV caught up over two target
    steps (7 rows, then 4 more), equal the reference MTP layer's at those rows."""
    from types import SimpleNamespace

    from meshserve.engine.scheduler import WorkItem, WorkKind
    from meshserve.engine.spec.mtp import MTPProposer
    from meshserve.models.loader import build_model, load_config

    path = tiny_model_dir("deepseek_v3", num_nextn_predict_layers=1)
    tokens = [1, *range(30, 41)]
    target_hidden, ref = reference_mtp_logits(path, tokens)
    cfg, _ = load_config(path)
    cfg.use_mtp = True
    model = build_model(cfg, path)
    proposer = MTPProposer(model, k=1, max_len=64, block_size=4, max_slots=2)
    seen = []

    def pick(logits, rows, step):
        seen.append(logits[0])
        return logits.argmax(-1)

    for start, n, known in ((0, 7, 8), (7, 4, 12)):
        request = SimpleNamespace(request_id="r", num_tokens=known, is_finished=False)
        item = WorkItem(request, WorkKind.PREFILL, start, n, 1)
        proposer.observe([item], target_hidden[start : start + n])
        assert len(proposer.propose(["r"], [tokens[:known]], [1], pick)[0]) == 1
    torch.testing.assert_close(torch.stack(seen), ref[[6, 10]], atol=1e-4, rtol=0)
