"""The OpenAI Responses API: ``POST /v1/responses`` (translated into a chat plan, rendered back as a response),
and the stored responses: ``GET``/``DELETE /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from server.app_state import AppState, state_of
from server.bodies import body_schema, json_reply
from server.chat_plan import ChatPlan, plan_chat
from server.errors import APIError
from server.generation import ChoiceEvent, Generation, ModelService, until_cancelled
from server.reply_blocks import ReplyBlocks
from server.responses_render import ResponseRenderer, assistant_turn
from server.responses_request import ResponsesRequest, conversation, to_chat
from server.routes.deps import log_start, until_disconnected
from server.routes.opening import open_request
from server.streaming import NamedEvent, SerializedEvent, SSEStyle, serialized, sse_response
from server.usage import UsageTracker

router = APIRouter()
ResponseId = Annotated[str, Path(max_length=128)]


@router.post("/v1/responses", response_model=None, openapi_extra=body_schema(ResponsesRequest))
async def create_response(request: Request):
    owner = request.state.key_owner

    def prepare(body: ResponsesRequest, service: ModelService,
                state: AppState) -> tuple[list[dict[str, Any]], ChatPlan]:
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            history = _stored(state, body.previous_response_id, owner, "previous_response_id").messages
        messages = conversation(body, history)
        return messages, plan_chat(service, to_chat(body, messages), state.limits)

    opened = await open_request(request, ResponsesRequest, prepare)
    body, state, service, (messages, plan) = opened.body, opened.state, opened.service, opened.prepared
    response_id = f"resp_{secrets.token_hex(24)}"  # unguessable: it is all that guards a stored response
    log_start(request, response_id, len(plan.prompt_ids))
    renderer = ResponseRenderer(response_id, service.name, body)
    reply = ReplyBlocks(plan)
    running = state.responses.started(response_id, owner, lambda: renderer.response(reply))
    tracker = UsageTracker(state.metrics, len(plan.prompt_ids), 1, shared_prompt=True)
    generation = Generation(response_id, plan.prompt_ids, plan.params, plan.stop_strings)
    events = until_cancelled(tracker.track(service.stream(generation)), running.cancelled)

    def save() -> None:
        if body.store and renderer.status in ("completed", "incomplete"):
            state.responses.put(response_id, owner, renderer.response(reply), [*messages, assistant_turn(reply)])

    if body.stream:
        try:
            first = await anext(events, None)  # surfaces 429/400 before the stream starts
        except BaseException:
            state.responses.ended(response_id)
            await events.aclose()  # type: ignore[attr-defined]
            raise
        return await sse_response(_stream(state, renderer, first, events, reply, save, response_id),
                                  SSEStyle(error=_failed(renderer, reply), done=False))
    try:
        await until_disconnected(request, _whole(events, reply))
    finally:
        state.responses.ended(response_id)
    renderer.settle(reply)

    def finished() -> dict[str, Any]:
        save()
        return renderer.response(reply)

    return await json_reply(request, finished)


async def _whole(events: AsyncIterator[ChoiceEvent], reply: ReplyBlocks) -> None:
    async with contextlib.aclosing(events):
        async for event in events:
            reply.feed(event)


async def _stream(state: AppState, renderer: ResponseRenderer, first: ChoiceEvent | None,
                  events: AsyncIterator[ChoiceEvent], reply: ReplyBlocks, save, response_id: str,
                  ) -> AsyncIterator[NamedEvent | SerializedEvent]:
    try:
        async with contextlib.aclosing(events):
            async for event in renderer.body_events(first, events, reply):
                yield event
        for event in await state.preparer.run(lambda: _closing(renderer, reply, save)):
            yield event
    finally:
        state.responses.ended(response_id)


def _closing(renderer: ResponseRenderer, reply: ReplyBlocks, save: Callable[[], None]) -> list[SerializedEvent]:
    """Store the response (before the client hears it ended, so that it can be continued at once), then the
    stream's closing events, serialized off the event loop: the last one holds the whole response."""
    save()
    return [serialized(event) for event in renderer.closing_events(reply)]


def _failed(renderer: ResponseRenderer, reply: ReplyBlocks):
    """The stream's ending for an error the renderer did not see (storing the response failed)."""

    def ending(exc: APIError | None) -> NamedEvent:
        renderer.fail(exc)
        return renderer.ending(reply)

    return ending


def _stored(state: AppState, response_id: str, owner: str | None, param: str | None = None):
    stored = state.responses.get(response_id, owner)
    if stored is None:
        raise APIError(404, f"no stored response with id {response_id[:128]!r}", param=param,
                       code="response_not_found")
    return stored


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(request: Request, response_id: ResponseId) -> Response:
    state, owner = state_of(request), request.state.key_owner
    running = state.responses.running(response_id, owner)
    if running is not None:
        return await json_reply(request, running.snapshot)
    stored = _stored(state, response_id, owner)
    return await json_reply(request, lambda: stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: ResponseId) -> dict[str, Any]:
    if not state_of(request).responses.delete(response_id, request.state.key_owner):
        raise APIError(404, f"no stored response with id {response_id[:128]!r}", code="response_not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel", response_model=None)
async def cancel_response(request: Request, response_id: ResponseId) -> Response:
    """Stop a running response; a finished one is returned as it is."""
    state, owner = state_of(request), request.state.key_owner
    running = state.responses.running(response_id, owner)
    if running is None:
        stored = _stored(state, response_id, owner)
        return await json_reply(request, lambda: stored.response)
    running.cancelled.set()
    return await json_reply(request, lambda: {**running.snapshot(), "status": "cancelled"})
