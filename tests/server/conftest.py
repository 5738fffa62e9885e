"""A real server on 127.0.0.1 (a free port) in a background thread, with a tiny Llama, per test module."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn

from meshserve import LLM
from meshserve.engine.async_llm import AsyncLLM
from meshserve.server.app import build_app

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, **engine_args) -> tuple[Server, uvicorn.Server, threading.Thread]:
    llm = AsyncLLM.from_args(model_dir, **{**ENGINE_ARGS, **engine_args})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(llm, MODEL), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", llm), server, thread


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(model_dir):
    running, uv, thread = start_server(model_dir)
    yield running
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def offline(model_dir) -> LLM:
    """The same model and settings without HTTP: the reference outputs."""
    return LLM(model_dir, **ENGINE_ARGS)
