"""The Anthropic Messages API: ``POST /v1/messages`` (translated into a chat plan, rendered back as a message) and
``POST /v1/messages/count_tokens``. Errors on these paths take Anthropic's envelope (``server.errors``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.bodies import body_schema, json_reply
from server.chat_plan import count_prompt_tokens, plan_chat
from server.generation import ChoiceEvent, Generation
from server.messages_render import MESSAGES_STREAM, MessageRenderer
from server.messages_request import CountTokensRequest, MessagesRequest, to_chat
from server.reply_blocks import ReplyBlocks
from server.routes.deps import log_start, until_disconnected
from server.routes.opening import open_request
from server.streaming import NamedEvent, sse_response
from server.usage import UsageTracker

router = APIRouter()


@router.post("/v1/messages", response_model=None, openapi_extra=body_schema(MessagesRequest))
async def create_message(request: Request):
    opened = await open_request(request, MessagesRequest,
                                lambda body, service, state: plan_chat(service, to_chat(body), state.limits))
    body, state, service, plan = opened.body, opened.state, opened.service, opened.prepared
    renderer = MessageRenderer(body)
    log_start(request, renderer.message_id, len(plan.prompt_ids))
    reply = ReplyBlocks(plan, prompt_tokens=len(plan.prompt_ids))
    tracker = UsageTracker(state.metrics, len(plan.prompt_ids), 1, shared_prompt=True)
    events = tracker.track(service.stream(Generation(renderer.message_id, plan.prompt_ids, plan.params,
                                                     plan.stop_strings)))
    if body.stream:
        try:
            first = await anext(events, None)  # surfaces 429/400 before the stream starts
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return await sse_response(_stream(renderer, first, events, reply), MESSAGES_STREAM)
    await until_disconnected(request, _whole(events, reply))
    return await json_reply(request, lambda: renderer.message(reply))


async def _whole(events: AsyncIterator[ChoiceEvent], reply: ReplyBlocks) -> None:
    async with contextlib.aclosing(events):
        async for event in events:
            reply.feed(event)


async def _stream(renderer: MessageRenderer, first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent],
                  reply: ReplyBlocks) -> AsyncIterator[NamedEvent]:
    async with contextlib.aclosing(events):
        async for event in renderer.stream(first, events, reply):
            yield event


@router.post("/v1/messages/count_tokens", response_model=None, openapi_extra=body_schema(CountTokensRequest))
async def count_tokens(request: Request):
    opened = await open_request(request, CountTokensRequest, lambda body, service, state: count_prompt_tokens(
        service, to_chat(body), state.limits))
    return {"input_tokens": opened.prepared}
