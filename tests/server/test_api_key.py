"""--api-key: /v1 routes and (de)tokenize answer 401 without the bearer key, /health and /metrics stay
open; --task embed: embeddings only."""

from __future__ import annotations

import dataclasses
import signal

import httpx
import openai
import pytest

from meshserve.engine.async_llm import AsyncLLM
from meshserve.server.serve import ServerThread, free_port
from meshserve.server.tasks import resolve_task

KEY = "sk-test-key"
MODEL = "tiny-embed"


@pytest.fixture(scope="module")
def guarded(model_dir):
    llm = AsyncLLM.from_args(model_dir, max_model_len=96, block_size=4)
    running = ServerThread(llm, MODEL, free_port(), api_key=KEY, task="embed")
    yield running.url
    running.stop()


def test_without_the_key_401_with_it_200(guarded):
    wrong = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "AuthenticationError"
    right = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list().data] == [MODEL]
    assert len(right.embeddings.create(model=MODEL, input="hello").data) == 1
    for path in ("/v1/embeddings", "/tokenize", "/detokenize"):
        refused = httpx.post(f"{guarded}{path}", json={})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == 401
    tokens = httpx.post(
        f"{guarded}/tokenize", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert tokens.status_code == 200 and tokens.json()["count"] > 0
    assert httpx.get(f"{guarded}/health").status_code == 200
    assert httpx.get(f"{guarded}/metrics").status_code == 200


def test_embed_task_refuses_generation(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="task 'embed'"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)


def test_auto_task_is_embed_for_embedding_checkpoints(server):
    mc = server.llm.engine.model_config
    assert resolve_task("auto", mc) == "generate"
    mc_st = dataclasses.replace(mc, pooling_defaults={"pooling_type": "MEAN", "normalize": True})
    assert resolve_task("auto", mc_st) == "embed"
    with pytest.raises(ValueError, match="task: must be one of auto, generate, embed"):
        resolve_task("classify", mc)


def test_serve_takes_the_key_from_meshserve_api_key(model_dir, monkeypatch):
    """``meshserve serve`` without --api-key reads the MESHSERVE_API_KEY switch."""
    from meshserve import switches
    from meshserve.server import serve as serve_module

    monkeypatch.setenv("MESHSERVE_API_KEY", KEY)
    switches.refresh()
    apps = []

    class Captured:
        def run(self) -> None:
            pass

    monkeypatch.setattr(
        serve_module, "graceful_server", lambda config, *_: apps.append(config.app) or Captured()
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve_module.serve(model_dir, port=free_port(), max_model_len=32, block_size=4)
    finally:  # serve installs its own signal handlers
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    keys = [m.kwargs["key"] for m in apps[0].user_middleware if m.cls.__name__ == "ApiKey"]
    assert keys == [KEY]
