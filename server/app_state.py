"""State shared by the routes of one application."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request

from engine import AsyncEngine
from engine.grammar import tokenizer_info
from engine.grammar_worker import IsolatedGrammarCompiler
from server.generation import ModelService
from server.limits import Limits
from server.metrics import Metrics
from server.model_task import served_task
from server.preparation import Preparer
from server.response_store import ResponseStore
from server.settings import Settings

log = logging.getLogger("qwen_serve")


class AppState:
    """What the routes share: the served model (None while loading), request limits, the preparation pool,
    metrics, stored responses, and the server's condition (draining, or failed for good: ``failure``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits.of(settings)
        self.preparer = Preparer(settings.prep_workers, settings.prep_timeout,
                                 max_pending=settings.max_waiting + settings.max_num_seqs)
        self.responses = ResponseStore(settings.response_store_bytes, settings.response_store_age)
        self.service: ModelService | None = None
        self.metrics: Metrics | None = None
        self.load_error: BaseException | None = None
        self.engine_error: BaseException | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.draining = False

    def attach(self, engine: AsyncEngine) -> None:
        """Serve ``engine``: a failure of it later drains the server and asks the process to exit (``on_fatal``)."""
        info = engine.info
        assert info.tokenizer is not None, "the server needs a tokenizer"
        settings = self.settings
        grammars = IsolatedGrammarCompiler(lambda: tokenizer_info(info.tokenizer, info.logits_width),
                                           workers=settings.grammar_workers, timeout=settings.grammar_timeout,
                                           cache_limit_bytes=settings.grammar_cache_bytes)
        self.metrics = Metrics(engine, settings.model_name)
        task, pooling = served_task(settings.task, settings.pooling, settings.model)
        log.info("serving %s for %s%s", settings.model_name, task, f" (pooling: {pooling})" if task == "embed" else "")
        self.service = ModelService(engine, settings.model_name, grammars, tool_call_format=settings.tool_call_format,
                                    enable_thinking=settings.enable_thinking,
                                    clamp_max_tokens=settings.clamp_max_tokens,
                                    generation_defaults=settings.override_generation_config,
                                    task=task, pooling=pooling)
        engine.on_failure.append(self._engine_failed)

    def load_failed(self, error: BaseException) -> None:
        self.load_error = error
        self._fatal()

    def _engine_failed(self, error: BaseException) -> None:
        self.engine_error = error
        self._fatal()

    def _fatal(self) -> None:
        self.draining = True
        if self.on_fatal is not None:
            self.on_fatal()

    @property
    def failure(self) -> str | None:
        """Why this server can serve nothing any more, or None."""
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.engine_error is not None:
            return "the engine has failed; the server is restarting"
        return None

    def close(self) -> None:
        self.preparer.shutdown()
        if self.service is not None:
            self.service.grammars.close()


def state_of(request: Request) -> AppState:
    return request.app.state.qwen
