"""Instances started on their own (one host or several) and a front end that connects to them.

    meshserve serve --model M --role decode  --kv-rendezvous tcp://P:29600 --listen D:29701 --api-key K
    meshserve serve --model M --role prefill --kv-rendezvous tcp://P:29600 --listen P:29700 --api-key K
    meshserve serve --model M --pd-connect prefill=P:29700,decode=D:29701 --api-key K   # the endpoint

The two instances meet on the KV link's rendezvous (the prefill side hosts the store, link.py); each then
waits for a front end on ``--listen``. The front end's connections carry pickled requests, so they need a
key (``--api-key`` or MESHSERVE_API_KEY: multiprocessing's HMAC handshake). A front end that goes away
leaves the instance waiting for the next one; "close" ends it.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Client, Listener
from typing import Any

from meshserve.config import EngineConfig
from meshserve.engine.pd.config import ROLES
from meshserve.engine.pd.frontend import PDEngine, Remote
from meshserve.engine.pd.instance import Instance, InstanceSpec
from meshserve.errors import InputError, require

logger = logging.getLogger(__name__)


def address(text: str, field: str) -> tuple[str, int]:
    """``HOST:PORT`` as a (host, port) pair."""
    host, _, port = text.rpartition(":")
    require(
        bool(host) and port.isdigit() and 0 < int(port) < 65536, field, f"must be HOST:PORT, got {text!r}"
    )
    return host, int(port)


def authkey(key: str | None, field: str) -> bytes:
    require(
        bool(key),
        field,
        "needs a key (--api-key or MESHSERVE_API_KEY): its connections carry pickled requests",
    )
    return key.encode()


def serve_instance(spec: InstanceSpec, listen: str, key: str | None) -> None:
    """Run one instance: join the KV link, then serve front ends on ``listen`` one at a time until "close"."""
    secret, where = authkey(key, "api_key"), address(listen, "listen")
    instance = Instance(spec)
    try:
        with Listener(where, authkey=secret) as listener:
            logger.info("%s instance: waiting for a front end on %s:%d", spec.role, *where)
            while True:
                try:
                    conn = listener.accept()
                except OSError as err:  # a client with the wrong key, or one that hung up at once
                    logger.warning("refused a front end: %s", err)
                    continue
                conn.send(("ready", instance.engine.max_model_len))
                if instance.serve(conn):
                    return
                logger.info("%s instance: the front end went away; waiting for the next", spec.role)
    finally:
        instance.close()


def run_role(
    model: str,
    role: str,
    kv_rendezvous: str,
    listen: str,
    key: str | None,
    timeout_s: float,
    **engine_args: Any,
) -> None:
    """``meshserve serve --role prefill|decode``: one instance of a pair, no HTTP of its own."""
    require(role in ROLES, "role", f"an instance started on its own is prefill or decode, got {role!r}")
    authkey(key, "api_key")  # before the model loads
    address(listen, "listen")
    config = EngineConfig.from_args(model, **engine_args)
    serve_instance(InstanceSpec(role, config, kv_rendezvous, timeout_s, config.num_threads), listen, key)


def connect(config: EngineConfig, spec: str, key: str | None, transfer_timeout_s: float = 30.0) -> PDEngine:
    """A front end over instances started on their own: ``spec`` is "prefill=HOST:PORT,decode=HOST:PORT"."""
    secret = authkey(key, "api_key")
    parts = dict(part.partition("=")[::2] for part in spec.split(","))
    require(
        set(parts) == set(ROLES), "pd_connect", f"must be prefill=HOST:PORT,decode=HOST:PORT, got {spec!r}"
    )
    endpoints = {}
    for role in ROLES:
        where = address(parts[role], "pd_connect")
        try:
            conn = Client(where, authkey=secret)
        except OSError as err:
            raise InputError(
                "pd_connect", f"cannot reach the {role} instance at {parts[role]}: {err}"
            ) from None
        endpoints[role] = Remote(conn, parts[role])
    return PDEngine(config, transfer_timeout_s, endpoints)
