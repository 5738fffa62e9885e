"""/v1/embeddings, /tokenize, /detokenize and /v1/models through the official client and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def vectors(response) -> torch.Tensor:
    return torch.tensor([d.embedding for d in sorted(response.data, key=lambda d: d.index)])


def test_embeddings_shape_norm_determinism_and_usage(client, server, offline):
    inputs = ["the quick brown fox", "jumps over", "the quick brown fox"]
    first = client.embeddings.create(model=server.model, input=inputs)  # the client asks for base64
    again = client.embeddings.create(model=server.model, input=inputs, encoding_format="float")
    hidden = offline.engine.model_config.hidden_size
    assert vectors(first).shape == (3, hidden) and [d.index for d in first.data] == [0, 1, 2]
    torch.testing.assert_close(vectors(first).norm(dim=1), torch.ones(3))
    # the same input gives the same vector to float rounding: the step's row count picks the GEMM kernel
    # (kernel tables are keyed by M), so two batches may sum in another order
    same = {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(vectors(first)[0], vectors(first)[2], **same)
    torch.testing.assert_close(vectors(first), vectors(again), **same)  # deterministic, base64 == float
    expected = torch.stack([o.embedding for o in offline.embed(inputs, use_tqdm=False)])
    torch.testing.assert_close(vectors(first), expected, atol=1e-5, rtol=1e-4)
    tokens = sum(len(o.prompt_token_ids) for o in offline.embed(inputs, use_tqdm=False))
    assert (first.usage.prompt_tokens, first.usage.total_tokens, first.model) == (
        tokens,
        tokens,
        server.model,
    )
    ids = offline.tokenizer.encode("jumps over")
    by_ids = client.embeddings.create(model=server.model, input=[ids, ids[:2]])
    assert (
        torch.allclose(vectors(by_ids)[0], vectors(first)[1], atol=1e-6, rtol=1e-5)
        and by_ids.usage.prompt_tokens == len(ids) + 2
    )
    raw = client.embeddings.create(model=server.model, input="jumps over", extra_body={"normalize": False})
    torch.testing.assert_close(vectors(raw)[0] / vectors(raw)[0].norm(), vectors(first)[1])


def test_embeddings_batch_with_a_running_generation(client, server):
    """An embedding asked for while a completion streams runs in the same engine steps and is unchanged."""
    alone = vectors(client.embeddings.create(model=server.model, input="jumps over"))
    scheduler = server.llm.engine.scheduler
    plans, schedule = [], scheduler.schedule
    scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    try:
        stream = client.completions.create(
            model=server.model, prompt="hello", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))  # it is decoding
        during = vectors(client.embeddings.create(model=server.model, input="jumps over"))
        text = "".join(c.choices[0].text for c in stream if c.choices)
    finally:
        scheduler.schedule = schedule
    assert any(len({it.request.pooling is None for it in plan.items}) == 2 for plan in plans)
    torch.testing.assert_close(during, alone, atol=1e-5, rtol=1e-4)
    assert text and server.blocks_free


def test_embedding_errors_name_the_field(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=server.model, input="x", dimensions=3)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=server.model, input=[])
    assert err.value.body["param"] == "input"


def test_tokenize_detokenize_round_trip(server, offline):
    tok = offline.tokenizer
    text = "the quick brown fox"
    body = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert body == {
        "count": len(tok.encode(text)),
        "max_model_len": 96,
        "tokens": tok.encode(text),
        "token_strs": None,
    }
    plain = httpx.post(
        f"{server.url}/tokenize",
        json={"prompt": text, "add_special_tokens": False, "return_token_strs": True},
    ).json()
    assert plain["token_strs"] == [tok.decode([t], skip_special_tokens=False) for t in plain["tokens"]]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": plain["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "hello"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"model": server.model, "messages": messages}).json()
    assert chat["tokens"] == tok.apply_chat_template(messages, True, add_special_tokens=False)
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_models_card(client, server):
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["id"] == card["root"] == server.model and card["max_model_len"] == 96
    assert card["owned_by"] == "meshserve" and card["created"] > 0
    assert client.completions.create(model=server.model, prompt="hi", max_tokens=2).choices
