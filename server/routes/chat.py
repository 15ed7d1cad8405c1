"""POST /v1/chat/completions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.bodies import body_schema, json_reply
from server.chat_plan import ChatPlan, plan_chat
from server.chat_reply import StreamedChatReply, whole_reply
from server.generation import ChoiceResult, Generation, ModelService, collect_choices
from server.logprobs import chat_logprobs
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
    new_id,
    now,
)
from server.routes.deps import log_start, until_disconnected
from server.routes.opening import open_request
from server.streaming import prepend, sse_response
from server.usage import UsageTracker

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(request: Request):
    opened = await open_request(request, ChatCompletionRequest,
                                lambda body, service, state: plan_chat(service, body, state.limits))
    body, state, service, planned = opened.body, opened.state, opened.service, opened.prepared
    generation = Generation(new_id("chatcmpl"), planned.prompt_ids, planned.params, planned.stop_strings, body.n)
    log_start(request, generation.request_id, len(planned.prompt_ids))
    tracker = UsageTracker(state.metrics, len(planned.prompt_ids), body.n, shared_prompt=True)
    if body.stream:
        return await sse_response(_chunks(service, generation, body, planned, tracker))
    return await until_disconnected(request, _complete(request, service, generation, body, planned, tracker))


async def _complete(request: Request, service: ModelService, generation: Generation, body: ChatCompletionRequest,
                    plan: ChatPlan, tracker: UsageTracker) -> Response:
    results = await collect_choices(tracker.track(service.stream(generation)), body.n)
    usage = tracker.usage()
    # parsing replies, spelling out logprobs and serializing grow with the reply: off the loop
    return await json_reply(request, lambda: ChatCompletionResponse(
        id=generation.request_id, created=now(), model=service.name,
        choices=_choices(service, body, plan, results), usage=usage))


def _choices(service: ModelService, body: ChatCompletionRequest, plan: ChatPlan,
             results: list[ChoiceResult]) -> list[ChatChoice]:
    top = body.top_logprobs or 0
    choices = []
    for index, result in enumerate(results):
        message, reason = whole_reply(plan, result.text, result.finish_reason)
        logprobs = chat_logprobs(service.tokenizer, result.token_ids, result.logprobs, top) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs))
    return choices


async def _chunks(service: ModelService, generation: Generation, body: ChatCompletionRequest,
                  plan: ChatPlan, tracker: UsageTracker) -> AsyncIterator[ChatCompletionChunk]:
    chunk_id, created = generation.request_id, now()
    top = body.top_logprobs or 0
    replies = [StreamedChatReply(plan) for _ in range(body.n)]

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=service.name, choices=choices, usage=usage)

    async with contextlib.aclosing(tracker.track(service.stream(generation))) as events:
        first = await anext(events, None)  # surfaces 429/400 before the stream starts
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(body.n)])
        async for event in prepend(first, events):
            reply = replies[event.index]
            logprobs = None
            if body.logprobs and event.logprobs:
                logprobs = chat_logprobs(service.tokenizer, event.token_ids, event.logprobs, top)
            deltas = reply.feed(event.text)
            reason = event.finish_reason
            if reason is not None:
                closing, reason = reply.finish(reason)
                deltas += closing
            for delta in deltas:
                yield chunk([ChatChunkChoice(index=event.index, delta=delta, logprobs=logprobs)])
                logprobs = None
            if logprobs is not None:
                yield chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(content=""), logprobs=logprobs)])
            if reason is not None:
                yield chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(), finish_reason=reason)])
    if body.include_usage:
        yield chunk([], tracker.usage())
