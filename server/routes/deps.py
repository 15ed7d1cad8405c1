"""What every route needs: the ready model service (or a clear 503/404)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.app_state import state_of
from server.errors import APIError
from server.generation import ModelService

T = TypeVar("T")
log = logging.getLogger("qwen_serve")


def log_start(request: Request, request_id: str, prompt_tokens: int) -> None:
    """One line per request: the server's own id (the engine's key) beside the client's ``X-Request-Id``."""
    log.info("request %s (X-Request-Id %s): %d prompt tokens", request_id, request.state.request_id, prompt_tokens)


def ready_service(request: Request, model: str | None = None) -> ModelService:
    state = state_of(request)
    if state.service is None:
        raise APIError(503, state.failure or "the model is still loading", code="not_ready")
    aliases = state.settings.model_aliases
    if model is not None and model != state.service.name and model not in aliases and "*" not in aliases:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.service.name}'",
                       param="model", code="model_not_found")
    return state.service


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (aborting its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(400, "the client disconnected", code="client_disconnected")
