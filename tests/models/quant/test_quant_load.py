"""Quantized checkpoints load into packed layers and compute what transformers computes with the weights
their integers stand for: GPTQ and AWQ written at test time by our writers (models/quant/export.py), and
int8 / int4 made at load from a float checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.engine import LLM, SamplingParams
from meshserve.errors import InputError
from meshserve.kernels.quant_weight import dequantize
from meshserve.models import load_model
from meshserve.models.layers.quant_embedding import QuantEmbedding
from meshserve.models.layers.quant_experts import QuantExperts
from meshserve.models.layers.quant_linear import QuantLinear
from meshserve.models.loader import LoadedModel, model_bytes
from meshserve.models.quant.export import export_quantized
from meshserve.models.quant.layout import quantized_split
from meshserve.testing import PagedSequences

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 7, 9, 300, 12, 88, 90, 91, 17, 5]]
MAX_TOKENS = 8
CASES = {
    "gptq4_act_order_asym": (
        "llama",
        {"method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False},
    ),
    "gptq4_sym": ("llama", {"method": "gptq", "bits": 4, "group_size": 32}),
    "gptq8_one_group": ("llama", {"method": "gptq", "bits": 8, "group_size": -1}),
    "gptq4_lm_head": ("llama", {"method": "gptq", "bits": 4, "group_size": 32, "lm_head": True}),
    "gptq4_v2": (
        "llama",
        {"method": "gptq", "bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"},
    ),
    "awq": ("llama", {"method": "awq", "group_size": 32}),
    "mixtral_gptq": ("mixtral", {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    "mixtral_awq": ("mixtral", {"method": "awq", "group_size": 32}),
    "mixtral_gptq_act_order": ("mixtral", {"method": "gptq", "bits": 4, "group_size": 32, "desc_act": True}),
    "compressed_w4a16_asym": (
        "llama",
        {"method": "compressed-tensors", "bits": 4, "group_size": 32, "sym": False},
    ),
    "mixtral_compressed_w8a16_channel": (
        "mixtral",
        {"method": "compressed-tensors", "bits": 8, "group_size": -1},
    ),
}


def greedy(path: Path, **engine_args) -> list[list[int]]:
    llm = LLM(str(path), max_num_batched_tokens=64, block_size=4, max_model_len=64, **engine_args)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    )
    return [o.outputs[0].token_ids for o in outs]


def transformers_greedy(path: Path) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in PROMPTS
        ]


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tiny_model_dir, tmp_path_factory):
    arch, kwargs = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    export_quantized(tiny_model_dir(arch), out / "quantized", out / "reference", **kwargs)
    return out / "quantized", out / "reference", arch, kwargs


def test_greedy_equals_the_dequantized_reference(exported):
    quantized, reference, *_ = exported
    assert greedy(quantized) == transformers_greedy(reference)


def test_layers_hold_only_packed_weights(exported):
    quantized, reference, arch, kwargs = exported
    lm, dense = load_model(quantized), load_model(reference)
    kinds = {type(m) for m in lm.model.modules()}
    assert QuantLinear in kinds and (QuantExperts in kinds) == (arch == "mixtral")
    # the head stays float unless the checkpoint says (GPTQ's lm_head: true)
    assert isinstance(lm.model.lm_head, QuantLinear) == kwargs.get("lm_head", False)
    assert model_bytes(lm.model) < model_bytes(dense.model)
    qkv = lm.model.layers[0].self_attn.qkv_proj
    assert torch.allclose(
        dequantize(qkv.quant_weight()), dense.model.layers[0].self_attn.qkv_proj.weight, atol=1e-6
    )


def dequantized_reference(path: Path, quantized: LoadedModel) -> LoadedModel:
    """The float model with each quantized layer's weights replaced by their dequantized values (a tied
    lm_head's are the embedding's too: one parameter)."""
    reference = load_model(path)
    modules = dict(reference.model.named_modules())
    for name, module in quantized.model.named_modules():
        if isinstance(module, QuantLinear):
            modules[name].weight.data = dequantize(module.quant_weight()).to(modules[name].weight.dtype)
        elif isinstance(module, QuantExperts):
            for which, p in enumerate(("gate_up_proj", "down_proj")):
                getattr(modules[name], p).data = dequantize(module.quant_weight(which))
    return reference


def paged_greedy(lm: LoadedModel, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one sequence through the model's forward, and its prompt's logits."""
    seqs = PagedSequences(lm)
    seq = seqs.add(prompt)
    first = logits = seqs.step({seq: len(prompt)})[seq]
    out = []
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        seqs.tokens[seq].append(out[-1])
        logits = seqs.step({seq: 1})[seq]
    return out, first


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("mixtral", False)])
def test_at_load_equals_its_dequantized_reference(method, arch, tied, tiny_model_dir):
    path = tiny_model_dir(arch, tie_word_embeddings=tied)
    quantized = load_model(path, quantization=method)
    reference = dequantized_reference(path, quantized)
    ours, ours_logits = paged_greedy(quantized, PROMPTS[1], MAX_TOKENS)
    theirs, their_logits = paged_greedy(reference, PROMPTS[1], MAX_TOKENS)
    assert torch.allclose(ours_logits, their_logits, atol=1e-4) and ours == theirs
    expect = 8 if method == "int8" else 4
    assert {m.bits for m in quantized.model.modules() if isinstance(m, QuantLinear)} == {expect}
    # the lm_head is quantized too; tied, the input embedding reads its rows (no float copy of either)
    assert isinstance(quantized.model.lm_head, QuantLinear)
    assert isinstance(quantized.model.embed_tokens, QuantEmbedding) == tied


@pytest.mark.parametrize(("method", "most"), [("int8", 0.55), ("int4", 0.3)])
def test_a_tied_quantized_head_is_resident_once(method, most, tiny_model_dir):
    path = tiny_model_dir("llama", tie_word_embeddings=True)
    model, dense = load_model(path, quantization=method).model, load_model(path).model
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert all(vocab not in p.shape for p in model.parameters())  # no float embedding left
    head = model.lm_head.nbytes
    assert 0 < head <= most * vocab * hidden * 2  # against the head in bfloat16
    assert model_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        m.nbytes for m in model.modules() if isinstance(m, QuantLinear | QuantExperts)
    )
    saved = model_bytes(dense) - model_bytes(model)
    assert saved > vocab * hidden * 4 - head  # the float32 embedding went, its quantized copy is the head


def test_the_knob_keeps_the_head_float(tiny_model_dir):
    path = tiny_model_dir("llama", tie_word_embeddings=True)
    model = load_model(path, quantization="int8", quantize_lm_head=False).model
    assert not isinstance(model.lm_head, QuantLinear) and isinstance(model.embed_tokens, torch.nn.Embedding)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_a_gptq_checkpoint_float_head_quantized_at_load(tiny_model_dir, tmp_path):
    export_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "r", "gptq", bits=4, group_size=32)
    quantized = load_model(tmp_path / "q", quantize_lm_head=True)
    head, float_head = quantized.model.lm_head, load_model(tmp_path / "r").model.lm_head.weight
    assert (head.bits, head.group_size) == (4, 64)  # int4 at load's grid: groups of gcd(K, 128)
    assert (dequantize(head.quant_weight()) - float_head).abs().max() < float_head.abs().max() / 8
    reference = dequantized_reference(tmp_path / "r", quantized)
    assert paged_greedy(quantized, PROMPTS[0], 4)[0] == paged_greedy(reference, PROMPTS[0], 4)[0]


def test_int8_at_load_serves_through_the_engine(tiny_model_dir):
    path = tiny_model_dir("llama")
    tokens = greedy(path, quantization="int8")
    assert [len(t) for t in tokens] == [MAX_TOKENS] * len(PROMPTS)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_tied_quantized_head_serves_through_the_engine_as_loaded(method, tiny_model_dir):
    # The engine packs its float linears after loading; the quantized head must keep its own embedding.
    path = tiny_model_dir("llama", tie_word_embeddings=True)
    llm = LLM(str(path), max_num_batched_tokens=64, block_size=4, max_model_len=64, quantization=method)
    out = llm.generate(
        [{"prompt_token_ids": PROMPTS[1]}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    )
    assert isinstance(llm.engine.model.embed_tokens, QuantEmbedding)
    loaded, _ = paged_greedy(load_model(path, quantization=method), PROMPTS[1], MAX_TOKENS)
    assert out[0].outputs[0].token_ids == loaded


def test_unsupported_bits_name_the_field(tiny_model_dir, tmp_path):
    export_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "r", "gptq", bits=4, group_size=32)
    config = (tmp_path / "q" / "config.json").read_text().replace('"bits": 4', '"bits": 3')
    (tmp_path / "q" / "config.json").write_text(config)
    with pytest.raises(InputError, match="quantization_config.bits: gptq with 3 bits is not supported"):
        load_model(tmp_path / "q")


def test_missing_packed_tensor_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    export_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "r", "awq", group_size=32)
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, str(file))
    with pytest.raises(InputError, match="model.layers.1.mlp.down_proj.scales"):
        load_model(tmp_path / "q")


def test_a_quantized_draft_model_is_refused(tiny_model_dir, tmp_path):
    export_quantized(tiny_model_dir("llama"), tmp_path / "q", tmp_path / "r", "gptq", bits=4, group_size=32)
    spec = {"method": "draft_model", "model": str(tmp_path / "q"), "num_speculative_tokens": 2}
    with pytest.raises(InputError, match="speculative_config.model: .* uses quantization"):
        LLM(str(tiny_model_dir("llama")), speculative_config=spec)


@pytest.mark.parametrize(("method", "most"), [("int8", 0.55), ("int4", 0.3)])
def test_quantized_layers_keep_only_their_packed_bytes(method, most, tiny_model_dir):
    """Resident bytes of the quantized layers against the same layers in bfloat16 (the issue's targets)."""
    model = load_model(tiny_model_dir("mixtral"), quantization=method).model
    packed, dense = quantized_split(model)
    assert 0 < packed <= most * dense
