"""POST /v1/rerank (and /rerank)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.app_state import state_of
from server.bodies import body_schema, json_reply, parse_body
from server.protocol import RerankRequest
from server.rerank import judge_prompts, rerank_response, scores
from server.routes.deps import ready_service, until_disconnected

router = APIRouter()


@router.post("/v1/rerank", response_model=None, openapi_extra=body_schema(RerankRequest))
@router.post("/rerank", response_model=None, include_in_schema=False)
async def rerank(request: Request):
    body = await parse_body(request, RerankRequest)
    state = state_of(request)
    service = ready_service(request, body.model)
    prompts = await until_disconnected(request, state.preparer.run(lambda: judge_prompts(service, body, state.limits)))
    relevance = await until_disconnected(request, scores(service, prompts))
    tokens = sum(map(len, prompts))
    if state.metrics is not None:
        state.metrics.pooled("rerank", tokens)
    return await json_reply(request, lambda: rerank_response(service, body, relevance, tokens))
