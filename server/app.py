"""``create_app(settings, engine)``: the FastAPI application, its middleware and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import AsyncEngine, EngineConfig, LLMEngine, SchedulerConfig
from server import __version__
from server.app_state import AppState
from server.bodies import install_body_schemas
from server.errors import error_response, install_error_handlers
from server.playground import is_page, mount_playground
from server.routes import chat, completions, embeddings, messages, models, rerank, responses, system, tokenize
from server.settings import Settings

log = logging.getLogger("qwen_serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def build_engine(settings: Settings, progress=None) -> AsyncEngine:
    """Load the model named by the settings into an engine thread."""
    config = EngineConfig(
        kv_cache_memory=settings.kv_cache_memory,
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        kv_cache_dtype=settings.kv_cache_dtype,
        state_snapshots=settings.state_snapshots,
        speculative_tokens=settings.speculative_tokens,
        scheduler=SchedulerConfig(max_num_seqs=settings.max_num_seqs,
                                  max_num_batched_tokens=settings.max_num_batched_tokens,
                                  max_waiting=settings.max_waiting),
    )
    llm = LLMEngine.from_model(settings.model, dtype=settings.dtype, device=settings.device, config=config,
                               cpu_isa=settings.cpu_isa,
                               cuda_int4_kernel=settings.cuda_int4_kernel, progress=progress,
                               tensor_parallel_size=settings.tensor_parallel_size,
                               quantization=None if settings.quantization == "none" else settings.quantization)
    return AsyncEngine(llm)


class BodyLimit:
    """413 for request bodies over ``limit`` bytes, declared or streamed (chunked): the body is read whole, up to
    the limit, before the application sees it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body larger than {self.limit} bytes", path=scope["path"])(
            scope, receive, send)


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> FastAPI:
    """The application. Without ``engine``, the model loads in the background and /health says 503 meanwhile."""
    state = AppState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        if engine is not None:
            state.attach(engine)
        else:
            threading.Thread(target=_load_in_background, args=(state,), daemon=True).start()
        yield
        state.draining = True
        state.close()
        if owned and state.service is not None:
            await asyncio.to_thread(state.service.engine.shutdown)

    app = FastAPI(title="qwen-serve", version=__version__, lifespan=lifespan)
    app.state.qwen = state
    install_error_handlers(app)
    install_body_schemas(app)
    for module in (chat, completions, embeddings, messages, models, rerank, responses, system, tokenize):
        app.include_router(module.router)
    if settings.ui:
        mount_playground(app)

    app.add_middleware(Guard, settings=settings, state=state)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app


class Guard:
    """Request ids (echoed, or made up), API keys (constant-time compare) and the drain gate."""

    def __init__(self, app: ASGIApp, settings: Settings, state: AppState) -> None:
        self.app, self.settings, self.state = app, settings, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(request_id):  # echoed and logged only: anything else is replaced
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        path = scope["path"]
        settings = self.settings
        open_path = path in settings.open_paths or (settings.ui and is_page(path))
        key = _presented_key(headers, settings.api_key)
        scope["state"]["key_owner"] = key_owner(key)
        if settings.api_key and not open_path and key is None:
            response = error_response(401, "missing or invalid API key", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"}, path=path)
            return await response(scope, receive, send_with_id)
        if self.state.draining and path.startswith("/v1/"):
            return await error_response(503, "the server is shutting down", code="draining", path=path)(
                scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


def _presented_key(headers: dict[str, str], keys: list[str]) -> str | None:
    """The configured key the request presents (``Authorization: Bearer`` or Anthropic's ``x-api-key``), if any."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    tokens = [token] if scheme.lower() == "bearer" and token else []
    tokens += [headers["x-api-key"]] if headers.get("x-api-key") else []
    for token in tokens:
        for key in keys:
            if hmac.compare_digest(token.encode(), key.encode()):
                return key
    return None


def key_owner(key: str | None) -> str | None:
    """Who owns what a request stores: a digest of its API key (None without keys)."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


def _load_in_background(state: AppState) -> None:
    from tqdm import tqdm

    try:
        with tqdm(desc=f"loading {state.settings.model_name}", unit="layer") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            engine = build_engine(state.settings, progress)
        state.attach(engine)
        settings = state.settings
        log.info("ready: model %s on http://%s:%s/v1", settings.model_name, settings.host, settings.port)
    except BaseException as exc:
        log.exception("loading the model failed")
        state.load_failed(exc)
