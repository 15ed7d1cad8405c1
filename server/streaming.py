"""Server-sent events: each API's chunks or named events; the first is awaited before the response starts, so that
errors found up front (queue full, bad request) still get their HTTP status. Chat and text completions end with
``[DONE]``, and an error after the start ends their stream with an event in OpenAI's error envelope, never a cut
connection; the Responses and Messages APIs render their own ending (``SSEStyle``)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.errors import APIError, error_body

T = TypeVar("T")
log = logging.getLogger("qwen_serve")


@dataclass(frozen=True)
class NamedEvent:
    """An SSE event with an ``event:`` name (the Responses and Messages APIs name every event)."""

    name: str
    data: dict


@dataclass(frozen=True)
class SerializedEvent:
    """A named event whose data is JSON text already: made on the preparation pool where it is large (a Responses
    stream's last event holds the whole response)."""

    name: str
    data: str


def serialized(event: NamedEvent) -> SerializedEvent:
    return SerializedEvent(event.name, json.dumps(event.data, ensure_ascii=False))


def openai_error(exc: APIError | None) -> dict:
    """The error envelope ending a chat or text completion stream (None: a fault of the server)."""
    if exc is None:
        return error_body(500, "the reply failed while it streamed", code="stream_failed")
    return error_body(exc.status, exc.message, exc.param, exc.code)


@dataclass(frozen=True)
class SSEStyle:
    """How one API ends a stream: the event for an error raised after it started, and whether ``[DONE]`` follows."""

    error: Callable[[APIError | None], dict | NamedEvent] = openai_error
    done: bool = True
    ping: Callable[[], ServerSentEvent] | None = None


OPENAI_STREAM = SSEStyle()


async def prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """``first`` (unless None) followed by ``rest``: for streams whose first item was awaited ahead."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _sse(chunk: BaseModel | dict | NamedEvent | SerializedEvent) -> dict[str, str]:
    if isinstance(chunk, NamedEvent):
        chunk = serialized(chunk)
    if isinstance(chunk, SerializedEvent):
        return {"event": chunk.name, "data": chunk.data}
    if isinstance(chunk, BaseModel):
        return {"data": chunk.model_dump_json(exclude_none=False)}
    return {"data": json.dumps(chunk)}


async def sse_response(chunks: AsyncIterator[BaseModel | dict | NamedEvent | SerializedEvent],
                       style: SSEStyle = OPENAI_STREAM) -> EventSourceResponse:
    """An SSE response over ``chunks``, started only once the first chunk exists."""
    iterator = aiter(chunks)
    first = await anext(iterator)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in prepend(first, iterator):
                yield _sse(chunk)
        except APIError as exc:
            yield _sse(style.error(exc))
        except Exception:  # a fault of this request's stream: it ends well-formed, the server goes on
            log.exception("a stream failed after it started")
            yield _sse(style.error(None))
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        if style.done:
            yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, ping_message_factory=style.ping)
