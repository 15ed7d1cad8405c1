"""POST /v1/rerank (and /rerank), POST /v1/score (and /score): judge prompts built off the loop, scored in passes
between steps, rendered in each API's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Request, Response

from server.app_state import state_of
from server.bodies import body_schema, json_reply, parse_body
from server.generation import ModelService
from server.limits import Limits
from server.protocol import RerankRequest, ScoreRequest
from server.rerank import judge_prompts, rerank_response, score_prompts, score_response, scores
from server.routes.deps import ready_service, until_disconnected

router = APIRouter()


@router.post("/v1/rerank", response_model=None, openapi_extra=body_schema(RerankRequest))
@router.post("/rerank", response_model=None, include_in_schema=False)
async def rerank(request: Request):
    body = await parse_body(request, RerankRequest)
    return await _judged(request, body.model, lambda service, limits: judge_prompts(service, body, limits),
                         lambda service, relevance, tokens: rerank_response(service, body, relevance, tokens))


@router.post("/v1/score", response_model=None, openapi_extra=body_schema(ScoreRequest))
@router.post("/score", response_model=None, include_in_schema=False)
async def score(request: Request):
    body = await parse_body(request, ScoreRequest)
    return await _judged(request, body.model, lambda service, limits: score_prompts(service, body, limits),
                         score_response)


async def _judged(request: Request, model: str, prompts_of: Callable[[ModelService, Limits], list[list[int]]],
                  render: Callable[[ModelService, torch.Tensor, int], dict[str, Any]]) -> Response:
    state = state_of(request)
    service = ready_service(request, model)
    prompts = await until_disconnected(request, state.preparer.run(lambda: prompts_of(service, state.limits)))
    relevance = await until_disconnected(request, scores(service, prompts))
    tokens = sum(map(len, prompts))
    if state.metrics is not None:
        state.metrics.pooled("rerank", tokens)
    return await json_reply(request, lambda: render(service, relevance, tokens))
