"""POST /v1/completions (text prompts or token-id prompts, echo, logprobs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.bodies import body_schema, json_reply
from server.errors import APIError
from server.generation import ChoiceEvent, ChoiceResult, Generation, ModelService, collect_choices, interleave
from server.limits import Limits
from server.logprobs import completion_logprobs
from server.preparation import Preparer
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
    now,
)
from server.routes.deps import log_start, until_disconnected
from server.routes.opening import open_request
from server.streaming import prepend, sse_response
from server.usage import UsageTracker

router = APIRouter()


@router.post("/v1/completions", response_model=None, openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request):
    completion_id = new_id("cmpl")
    opened = await open_request(request, CompletionRequest,
                                lambda body, service, state: _plan(service, body, completion_id, state.limits))
    body, state, service, generations = opened.body, opened.state, opened.service, opened.prepared
    log_start(request, completion_id, sum(len(g.prompt_ids) for g in generations))
    tracker = UsageTracker(state.metrics, sum(len(g.prompt_ids) for g in generations) * body.n,
                           len(generations) * body.n, shared_prompt=False)
    events = tracker.track(_merged(service, generations, body.n))
    job = _Job(completion_id, service, generations, body, state.preparer)
    if body.stream:
        return await sse_response(_chunks(job, events, tracker))
    return await until_disconnected(request, _complete(request, job, events, tracker))


def _plan(service: ModelService, body: CompletionRequest, request_id: str, limits: Limits) -> list[Generation]:
    """One engine request per prompt (tokenized here, on a preparation thread)."""
    limits.check_completion(body, service.vocab_size)
    limits.check_text(body.prompts(), service.max_model_len, "prompt")
    prompts = [service.text_prompt_ids(p) for p in body.prompts()]
    if any(not ids for ids in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return [Generation(f"{request_id}-p{i}", ids,
                       service.sampling_params(body, len(ids), chat=False, logprobs=body.logprobs), body.stop, body.n)
            for i, ids in enumerate(prompts)]


async def _merged(service: ModelService, generations: list[Generation], n: int) -> AsyncIterator[ChoiceEvent]:
    """Every prompt's choices in one stream, indexed prompt * n + choice: the prompts run at once (batched)."""

    async def indexed(offset: int, generation: Generation) -> AsyncIterator[ChoiceEvent]:
        async with contextlib.aclosing(service.stream(generation)) as stream:
            async for event in stream:
                event.index += offset * n
                yield event

    async with contextlib.aclosing(interleave([indexed(i, g) for i, g in enumerate(generations)])) as events:
        async for event in events:
            yield event


class _Job:
    """One completions request under way: its id, model, engine requests and body, and the echoes of its
    prompts."""

    def __init__(self, completion_id: str, service: ModelService, generations: list[Generation],
                 body: CompletionRequest, preparer: Preparer) -> None:
        self.id, self.service, self.generations, self.body = completion_id, service, generations, body
        self.preparer = preparer  # spelling out text and logprobs grows with them: off the loop
        self._done: dict[int, tuple[str, CompletionLogprobs | None]] = {}

    async def echo(self, index: int) -> tuple[str, CompletionLogprobs | None]:
        """Choice ``index``'s prompt text, and its logprobs when asked: computed once per prompt, whatever ``n``."""
        prompt = index // self.body.n
        if prompt not in self._done:
            ids, tokenizer, top = self.generations[prompt].prompt_ids, self.service.tokenizer, self.body.logprobs
            entries = None if top is None else await self.service.prompt_logprobs(ids, top)
            self._done[prompt] = await self.preparer.run(lambda: (
                tokenizer.decode(ids), None if entries is None else completion_logprobs(tokenizer, ids, entries, top)))
        return self._done[prompt]


async def _complete(request: Request, job: _Job, events: AsyncIterator[ChoiceEvent],
                    tracker: UsageTracker) -> Response:
    service, generations, body = job.service, job.generations, job.body
    results = await collect_choices(events, len(generations) * body.n)
    echoes = [await job.echo(index) for index in range(len(results))] if body.echo else []
    usage = tracker.usage()
    return await json_reply(request, lambda: CompletionResponse(
        id=job.id, created=now(), model=service.name, choices=_choices(service, body, results, echoes), usage=usage))


def _choices(service: ModelService, body: CompletionRequest, results: list[ChoiceResult],
             echoes: list[tuple[str, CompletionLogprobs | None]]) -> list[CompletionChoice]:
    choices = []
    for index, result in enumerate(results):
        text, logprobs = result.text, None
        if body.logprobs is not None:
            logprobs = completion_logprobs(service.tokenizer, result.token_ids, result.logprobs, body.logprobs)
        if echoes:
            prompt_text, prompt_logprobs = echoes[index]
            text = prompt_text + text
            if logprobs is not None and prompt_logprobs is not None:
                shift = len(prompt_text)
                logprobs.tokens[:0] = prompt_logprobs.tokens
                logprobs.token_logprobs[:0] = prompt_logprobs.token_logprobs
                logprobs.top_logprobs[:0] = prompt_logprobs.top_logprobs
                logprobs.text_offset[:] = prompt_logprobs.text_offset + [o + shift for o in logprobs.text_offset]
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=result.finish_reason))
    return choices


async def _chunks(job: _Job, events: AsyncIterator[ChoiceEvent], tracker: UsageTracker
                  ) -> AsyncIterator[CompletionResponse]:
    service, generations, body = job.service, job.generations, job.body
    chunk_id, created = job.id, now()

    def chunk(choices: list[CompletionChoice], usage=None) -> CompletionResponse:
        return CompletionResponse(id=chunk_id, created=created, model=service.name, choices=choices, usage=usage)

    async with contextlib.aclosing(events):
        first = await anext(events, None)
        if body.echo:
            for index in range(len(generations) * body.n):
                text, logprobs = await job.echo(index)
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
