"""POST /v1/chat/completions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.app_state import state_of
from server.generation import Generation, ModelService, collect_choices, prepend
from server.logprobs import chat_logprobs
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    Usage,
    new_id,
    now,
)
from server.routes.deps import ready_service, until_disconnected
from server.streaming import sse_response
from server.usage import UsageTracker

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = ready_service(request, body.model)
    prompt_ids = service.chat_prompt_ids(body.messages, body.add_generation_prompt)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = service.sampling_params(body, len(prompt_ids), chat=True, logprobs=top)
    generation = Generation(request.state.request_id, prompt_ids, params, body.stop, body.n)
    tracker = UsageTracker(state_of(request).metrics, len(prompt_ids), body.n)
    if body.stream:
        return await sse_response(_chunks(service, generation, body, tracker))
    return await until_disconnected(request, _complete(service, generation, body, tracker))


async def _complete(service: ModelService, generation: Generation, body: ChatCompletionRequest,
                    tracker: UsageTracker) -> ChatCompletionResponse:
    choices = await collect_choices(tracker.track(service.stream(generation)), body.n)
    top = body.top_logprobs or 0
    choices = [
        ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                   logprobs=chat_logprobs(service.tokenizer, c.token_ids, c.logprobs, top) if body.logprobs else None)
        for i, c in enumerate(choices)
    ]
    return ChatCompletionResponse(id=new_id("chatcmpl"), created=now(), model=service.name, choices=choices,
                                  usage=tracker.usage())


async def _chunks(service: ModelService, generation: Generation, body: ChatCompletionRequest,
                  tracker: UsageTracker) -> AsyncIterator[ChatCompletionChunk]:
    chunk_id, created = new_id("chatcmpl"), now()
    top = body.top_logprobs or 0

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=service.name, choices=choices, usage=usage)

    async with contextlib.aclosing(tracker.track(service.stream(generation))) as events:
        first = await anext(events, None)  # surfaces 429/400 before the stream starts
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(body.n)])
        async for event in prepend(first, events):
            if event.text or (body.logprobs and event.logprobs):
                logprobs = None
                if body.logprobs:
                    logprobs = chat_logprobs(service.tokenizer, event.token_ids, event.logprobs, top)
                yield chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(content=event.text),
                                             logprobs=logprobs)])
            if event.finish_reason is not None:
                yield chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(),
                                             finish_reason=event.finish_reason)])
    if body.include_usage:
        yield chunk([], tracker.usage())
