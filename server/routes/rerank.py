"""POST /v1/rerank (and /rerank), POST /v1/score (and /score): judge prompts built off the loop, scored in the
engine's continuous batch, rendered in each API's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Request, Response

from server.bodies import body_schema, json_reply
from server.protocol import RerankRequest, ScoreRequest
from server.rerank import judge_prompts, rerank_response, score_prompts, score_response, scores
from server.routes.deps import until_disconnected
from server.routes.opening import Opened, open_request

router = APIRouter()


@router.post("/v1/rerank", response_model=None, openapi_extra=body_schema(RerankRequest))
@router.post("/rerank", response_model=None, include_in_schema=False)
async def rerank(request: Request):
    opened = await open_request(request, RerankRequest,
                                lambda body, service, state: judge_prompts(service, body, state.limits))
    return await _judged(request, opened, lambda relevance, tokens: rerank_response(opened.service, opened.body,
                                                                                   relevance, tokens))


@router.post("/v1/score", response_model=None, openapi_extra=body_schema(ScoreRequest))
@router.post("/score", response_model=None, include_in_schema=False)
async def score(request: Request):
    opened = await open_request(request, ScoreRequest,
                                lambda body, service, state: score_prompts(service, body, state.limits))
    return await _judged(request, opened, lambda relevance, tokens: score_response(opened.service, relevance,
                                                                                  tokens))


async def _judged(request: Request, opened: Opened[Any, list[list[int]]],
                  render: Callable[[torch.Tensor, int], dict[str, Any]]) -> Response:
    """Score the prepared judge prompts, count their tokens, render the reply off the loop."""
    prompts, service, metrics = opened.prepared, opened.service, opened.state.metrics
    relevance = await until_disconnected(request, scores(service, prompts))
    tokens = sum(map(len, prompts))
    if metrics is not None:
        metrics.pooled("rerank", tokens)
    return await json_reply(request, lambda: render(relevance, tokens))
