"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.app_state import state_of
from server.bodies import body_schema, json_reply, parse_body
from server.embeddings import embed, embedding_prompts, embedding_response
from server.protocol import EmbeddingRequest
from server.routes.deps import ready_service, until_disconnected

router = APIRouter()


@router.post("/v1/embeddings", response_model=None, openapi_extra=body_schema(EmbeddingRequest))
async def embeddings(request: Request):
    body = await parse_body(request, EmbeddingRequest)
    state = state_of(request)
    service = ready_service(request, body.model)
    prompts = await until_disconnected(request, state.preparer.run(
        lambda: embedding_prompts(service, body, state.limits)))
    vectors = await until_disconnected(request, embed(service, prompts))
    tokens = sum(map(len, prompts))
    if state.metrics is not None:
        state.metrics.pooled("embed", tokens)
    return await json_reply(request, lambda: embedding_response(service, body, vectors, tokens))
