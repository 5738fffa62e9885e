"""A request's structured-output fields -> StructuredOutputsParams, and the field errors are named after.

OpenAI's ``response_format`` ({"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"}), vLLM's ``structured_outputs`` object and its older ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields; at most one of them per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from meshserve.engine.sampling_params import SamplingParams
from meshserve.engine.structured_params import StructuredOutputsParams
from meshserve.errors import InputError, require

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs(body: Any) -> tuple[StructuredOutputsParams | None, str]:
    """The spec a request body asks for (None: none) and the field that asked."""
    given = [
        name
        for name in ("response_format", "structured_outputs", *GUIDED)
        if getattr(body, name, None) is not None
    ]
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "text":
        given.remove("response_format")
    if not given:
        return None, "structured_outputs"
    field = given[0]
    require(len(given) == 1, field, f"give one of {', '.join(given)}, not several")
    try:
        if field == "response_format":
            if fmt.type == "json_object":
                return StructuredOutputsParams(json_object=True), field
            require(
                fmt.json_schema is not None and fmt.json_schema.schema_ is not None,
                "response_format.json_schema.schema",
                'is required with type "json_schema"',
            )
            return StructuredOutputsParams(json=fmt.json_schema.schema_), field
        if field == "structured_outputs":
            require(isinstance(body.structured_outputs, dict), field, "must be an object")
            return StructuredOutputsParams(**body.structured_outputs), field
        return StructuredOutputsParams(**{GUIDED[field]: getattr(body, field)}), field
    except TypeError as err:  # an unknown key in structured_outputs
        raise InputError(field, str(err).replace("__init__() ", "")) from None
    except InputError as err:  # name the request's own field
        raise InputError(err.field.replace("structured_outputs", field, 1), err.message) from None


async def constrained(
    params: SamplingParams, body: Any, grammars: Any, tool_spec: StructuredOutputsParams | None = None
) -> SamplingParams:
    """``params`` with the body's spec (or the tools' one), compiled here in a worker thread so a bad spec
    is a 400 naming its field and the engine thread finds it compiled (``grammars``: the engine's)."""
    spec, field = structured_outputs(body)
    if tool_spec is not None:
        require(spec is None, field, "cannot be combined with tool_choice required or a named function")
        spec, field = tool_spec, "tools"
    if spec is None:
        return params
    if grammars is not None:  # (a distributed engine's ranks compile their own)
        await asyncio.to_thread(grammars.compile, spec, field)
    return dataclasses.replace(params, structured_outputs=spec)
