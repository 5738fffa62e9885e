"""Admin routes (behind --api-key like /v1): POST /admin/role switches an instance of a prefill/decode pair
live, e.g. ``{"instance": "prefill", "role": "mixed"}`` (engine/pd/frontend.py, PDEngine.set_role)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from meshserve.engine.async_llm import AsyncLLM
from meshserve.errors import require


class RoleChange(BaseModel):
    instance: str
    role: str


def add_admin_routes(app: FastAPI, llm: AsyncLLM) -> None:
    @app.post("/admin/role")
    async def set_role(change: RoleChange) -> dict[str, Any]:
        engine = llm.engine
        require(
            hasattr(engine, "roles"),
            "instance",
            "this server runs one mixed engine; start it with --pd prefill=1,decode=1 to switch roles",
        )
        await llm.call(lambda e: e.set_role(change.instance, change.role))  # in the engine thread
        return {"roles": dict(engine.roles)}
