"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.generation import ModelService
from server.routes.deps import ready_service

router = APIRouter()
CREATED = 1700000000


def describe(service: ModelService) -> dict:
    return {"id": service.name, "object": "model", "created": CREATED, "owned_by": "qwen-serve",
            "max_model_len": service.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [describe(ready_service(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    return describe(ready_service(request, model_id))
