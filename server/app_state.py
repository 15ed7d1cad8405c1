"""State shared by the routes of one application."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from engine import AsyncEngine
from server.generation import ModelService
from server.metrics import Metrics
from server.settings import Settings


class AppState:
    """What the routes share: the served model (None while loading), metrics, and the drain flag."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service: ModelService | None = None
        self.metrics: Metrics | None = None
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self.draining = False

    def attach(self, engine: AsyncEngine) -> None:
        self.metrics = Metrics(engine, self.settings.model_name)
        self.service = ModelService(engine, self.settings.model_name)


def state_of(request: Request) -> AppState:
    return request.app.state.qwen
