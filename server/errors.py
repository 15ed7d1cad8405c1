"""The error shapes (OpenAI's; Anthropic's under ``/v1/messages``), and the exception handlers that produce them
for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("qwen_serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
                    503: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"


class APIError(Exception):
    """An error with an HTTP status, returned as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The envelope; text from the request (a field name, a key) may hold what UTF-8 cannot, so it is made safe."""
    return {"error": {"message": _safe(message), "type": _TYPES.get(status, "server_error"),
                      "param": None if param is None else _safe(param), "code": code}}


def anthropic_error_body(status: int, message: str) -> dict:
    """Anthropic's envelope: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": _safe(message)}}


def speaks_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def _safe(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error in the envelope of the API that ``path`` belongs to."""
    body = anthropic_error_body(status, message) if speaks_anthropic(path) else error_body(status, message, param,
                                                                                              code)
    return JSONResponse(body, status_code=status, headers=headers)


def invalid_field(error: dict) -> APIError:
    """A 400 for one validation error (pydantic's shape), naming the field: ``param`` is its dotted location."""
    location = [str(part)[:80] for part in error.get("loc", ()) if part != "body" and not _union_tag(part)]
    param = ".".join(location) or None
    message = str(error.get("msg", "invalid request"))[:500]
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=error.get("type"))


def _union_tag(part: object) -> bool:
    """A location part that names which member of a union was tried (``list[InputItem]``, ``str``), not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers,
                              path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Path and query parameters (bodies are validated off the loop: ``server.bodies``)."""
        errors = exc.errors()
        error = invalid_field(errors[0] if errors else {"msg": "invalid request"})
        return error_response(400, error.message, param=error.param, code=error.code, path=request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own (a body that is not JSON or not UTF-8, an unknown path or method)."""
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers, path=request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", path=request.url.path)
