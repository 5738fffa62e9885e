"""A real server on 127.0.0.1 (a free port) in a background thread, with a tiny Llama, per test module."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshserve import LLM
from meshserve.engine.async_llm import AsyncLLM
from meshserve.server.serve import ServerThread, free_port

ENGINE_ARGS = {"max_model_len": 96, "max_num_seqs": 32, "max_num_batched_tokens": 256, "block_size": 4}
MODEL = "tiny-llama"


@dataclass
class Server:
    url: str
    llm: AsyncLLM
    model: str = MODEL

    @property
    def blocks_free(self) -> bool:
        blocks = self.llm.engine.blocks
        return blocks.num_free_blocks == blocks.num_blocks


def start_server(model_dir: str, **engine_args) -> ServerThread:
    return ServerThread(AsyncLLM.from_args(model_dir, **{**ENGINE_ARGS, **engine_args}), MODEL, free_port())


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(model_dir):
    running = start_server(model_dir)
    yield Server(running.url, running.llm)
    running.stop()


@pytest.fixture(scope="module")
def offline(model_dir) -> LLM:
    """The same model and settings without HTTP: the reference outputs."""
    return LLM(model_dir, **ENGINE_ARGS)
