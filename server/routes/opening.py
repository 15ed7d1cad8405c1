"""How an endpoint that runs the model opens: its body parsed, the ready model service, and the request's
preparation (tokenizing, planning) run on the preparation pool, abandoned if the client goes away."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel

from server.app_state import AppState, state_of
from server.bodies import parse_body
from server.generation import ModelService
from server.routes.deps import ready_service, until_disconnected

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")


@dataclass(frozen=True)
class Opened(Generic[B, T]):
    """A request past its opening: its body, the app's state, the model service and what was prepared."""

    body: B
    state: AppState
    service: ModelService
    prepared: T


async def open_request(request: Request, body_type: type[B],
                       prepare: Callable[[B, ModelService, AppState], T]) -> Opened[B, T]:
    """Parse the body as ``body_type`` (a 400 naming the first bad field), find the model it names (503 while
    loading, 404 for another name), then run ``prepare`` on the preparation pool."""
    body = await parse_body(request, body_type)
    state = state_of(request)
    service = ready_service(request, body.model)  # type: ignore[attr-defined]  (every such body names one)
    prepared = await until_disconnected(request, state.preparer.run(lambda: prepare(body, service, state)))
    return Opened(body, state, service, prepared)
