"""POST /v1/completions (text prompts or token-id prompts, echo, logprobs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.app_state import state_of
from server.errors import APIError
from server.generation import ChoiceEvent, Generation, ModelService, collect_choices
from server.logprobs import completion_logprobs
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, new_id, now
from server.routes.deps import ready_service, until_disconnected
from server.streaming import prepend, sse_response
from server.usage import UsageTracker

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request):
    service = ready_service(request, body.model)
    prompts = [service.text_prompt_ids(p) for p in body.prompts()]
    if any(not ids for ids in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    generations = [
        Generation(f"{request.state.request_id}-p{i}", ids,
                   service.sampling_params(body, len(ids), chat=False, logprobs=body.logprobs), body.stop, body.n)
        for i, ids in enumerate(prompts)
    ]
    tracker = UsageTracker(state_of(request).metrics, sum(len(g.prompt_ids) for g in generations) * body.n,
                           len(generations) * body.n)
    events = tracker.track(_merged(service, generations, body.n))
    if body.stream:
        return await sse_response(_chunks(service, generations, body, events, tracker))
    return await until_disconnected(request, _complete(service, generations, body, events, tracker))


async def _merged(service: ModelService, generations: list[Generation], n: int) -> AsyncIterator[ChoiceEvent]:
    """Every prompt's choices in one stream, indexed prompt * n + choice."""
    for offset, generation in enumerate(generations):
        async with contextlib.aclosing(service.stream(generation)) as stream:
            async for event in stream:
                event.index += offset * n
                yield event


async def _echo(service: ModelService, generation: Generation, body: CompletionRequest):
    """Prompt text, and its logprobs when asked, for ``echo``."""
    text = service.tokenizer.decode(generation.prompt_ids)
    if body.logprobs is None:
        return text, None
    entries = await service.prompt_logprobs(generation.prompt_ids, body.logprobs)
    return text, completion_logprobs(service.tokenizer, generation.prompt_ids, entries, body.logprobs)


async def _complete(service: ModelService, generations: list[Generation], body: CompletionRequest,
                    events: AsyncIterator[ChoiceEvent], tracker: UsageTracker) -> CompletionResponse:
    results = await collect_choices(events, len(generations) * body.n)
    choices = []
    for index, result in enumerate(results):
        text, logprobs = result.text, None
        if body.logprobs is not None:
            logprobs = completion_logprobs(service.tokenizer, result.token_ids, result.logprobs, body.logprobs)
        if body.echo:
            prompt_text, prompt_logprobs = await _echo(service, generations[index // body.n], body)
            text = prompt_text + text
            if logprobs is not None and prompt_logprobs is not None:
                shift = len(prompt_text)
                logprobs.tokens[:0] = prompt_logprobs.tokens
                logprobs.token_logprobs[:0] = prompt_logprobs.token_logprobs
                logprobs.top_logprobs[:0] = prompt_logprobs.top_logprobs
                logprobs.text_offset[:] = prompt_logprobs.text_offset + [o + shift for o in logprobs.text_offset]
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=result.finish_reason))
    return CompletionResponse(id=new_id("cmpl"), created=now(), model=service.name, choices=choices,
                              usage=tracker.usage())


async def _chunks(service: ModelService, generations: list[Generation], body: CompletionRequest,
                  events: AsyncIterator[ChoiceEvent], tracker: UsageTracker) -> AsyncIterator[CompletionResponse]:
    chunk_id, created = new_id("cmpl"), now()

    def chunk(choices: list[CompletionChoice], usage=None) -> CompletionResponse:
        return CompletionResponse(id=chunk_id, created=created, model=service.name, choices=choices, usage=usage)

    async with contextlib.aclosing(events):
        first = await anext(events, None)
        if body.echo:
            for index in range(len(generations) * body.n):
                text, logprobs = await _echo(service, generations[index // body.n], body)
                yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)])
        async for event in prepend(first, events):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(service.tokenizer, event.token_ids, event.logprobs, body.logprobs)
            if event.text or event.finish_reason or logprobs:
                yield chunk([CompletionChoice(index=event.index, text=event.text, logprobs=logprobs,
                                              finish_reason=event.finish_reason)])
    if body.include_usage:
        yield chunk([], tracker.usage())
