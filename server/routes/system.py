"""GET /health, /metrics and /version."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.app_state import state_of
from server.errors import error_response

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when ready; 503 while loading, draining, or after a load or engine failure."""
    state = state_of(request)
    if state.failure is not None:
        return error_response(503, state.failure, code="failed")
    if state.service is None:
        return error_response(503, "the model is still loading", code="loading")
    if state.draining:
        return error_response(503, "the server is shutting down", code="draining")
    if not state.service.engine.is_alive:
        return error_response(503, "the engine has failed", code="engine_dead")
    return Response('{"status":"ok"}', media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    if state.metrics is None:
        return Response("", media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}
