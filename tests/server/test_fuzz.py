"""Property-based fuzz of the HTTP API from its own OpenAPI schema (schemathesis): never a 5xx."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode


def never_a_server_error(operation, mode: GenerationMode, url: str):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case) -> None:
        response = case.call(base_url=url, timeout=60)
        assert response.status_code < 500, (operation.path, case.body, response.text[:300])

    return call


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(server, mode):
    """Valid bodies (positive) and bodies that break the schema (negative) alike get a 2xx or a 4xx."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break in a request without parameters
        never_a_server_error(operation, mode, server.url)()
    assert httpx.get(f"{server.url}/health").status_code == 200 and server.blocks_free
