"""Server-sent events: JSON chunks, then ``[DONE]``; the first event is awaited before the response starts,
so that errors found up front (queue full, bad request) still get their HTTP status. Any error after that ends
the stream with an event in OpenAI's error envelope (then ``[DONE]``), never a cut connection."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from server.errors import APIError, error_body

T = TypeVar("T")
log = logging.getLogger("qwen_serve")


async def prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """``first`` (unless None) followed by ``rest``: for streams whose first item was awaited ahead."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def sse_response(chunks: AsyncIterator[BaseModel | dict]) -> EventSourceResponse:
    """An SSE response over ``chunks``, started only once the first chunk exists."""
    iterator = aiter(chunks)
    first = await anext(iterator)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in prepend(first, iterator):
                data = chunk.model_dump_json(exclude_none=False) if isinstance(chunk, BaseModel) else json.dumps(chunk)
                yield {"data": data}
        except APIError as exc:
            yield {"data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
        except Exception:  # a fault of this request's stream: it ends well-formed, the server goes on
            log.exception("a stream failed after it started")
            yield {"data": json.dumps(error_body(500, "the reply failed while it streamed", code="stream_failed"))}
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)
