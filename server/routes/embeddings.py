"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.bodies import body_schema, json_reply
from server.embeddings import embed, embedding_prompts, embedding_response
from server.protocol import EmbeddingRequest
from server.routes.deps import until_disconnected
from server.routes.opening import open_request

router = APIRouter()


@router.post("/v1/embeddings", response_model=None, openapi_extra=body_schema(EmbeddingRequest))
async def embeddings(request: Request):
    opened = await open_request(request, EmbeddingRequest,
                                lambda body, service, state: embedding_prompts(service, body, state.limits))
    body, state, service, prompts = opened.body, opened.state, opened.service, opened.prepared
    vectors = await until_disconnected(request, embed(service, prompts))
    tokens = sum(map(len, prompts))
    if state.metrics is not None:
        state.metrics.pooled("embed", tokens)
    return await json_reply(request, lambda: embedding_response(service, body, vectors, tokens))
