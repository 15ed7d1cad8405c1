"""Request bodies parsed and validated off the event loop, and replies serialized there too: both grow with what a
client sends or asks for, so the loop only hands bytes over. Routes declare their body with ``body_schema`` (for
the OpenAPI document) and read it with ``parse_body``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from server.app_state import state_of
from server.errors import invalid_field
from server.routes.deps import until_disconnected

M = TypeVar("M", bound=BaseModel)
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    _BODY_MODELS[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def parse_body(request: Request, model: type[M]) -> M:
    """The body as ``model``, parsed and validated on a preparation thread: a 400 naming the first bad field."""
    raw = await request.body()  # already read whole, within its limit, by the body-limit middleware
    return await until_disconnected(request, state_of(request).preparer.run(lambda: validate_body(model, raw)))


def validate_body(model: type[M], raw: bytes) -> M:
    """Lists are bounded and stop at their first bad item (``protocol.items``), so the errors are few; one is
    reported: the first that is not merely a union member of another type."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise invalid_field(next((e for e in errors if not e["type"].endswith("_type")), errors[0])) from None


async def json_reply(request: Request, build: Callable[[], BaseModel | dict]) -> Response:
    """``build()``'s result as a JSON response, built and serialized on a preparation thread."""

    def serialized() -> bytes:
        value = build()
        return value.model_dump_json().encode() if isinstance(value, BaseModel) else _dump(value)

    return Response(await state_of(request).preparer.run(serialized), media_type="application/json")


def _dump(value: dict) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def install_body_schemas(app: FastAPI) -> None:
    """Put the body models that routes name in ``body_schema`` into the OpenAPI document's components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, definitions = models_json_schema([(m, "validation") for m in _BODY_MODELS.values()],
                                                ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
