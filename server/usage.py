"""Token usage of one request, and the latency metrics observed while it streams."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from server.generation import ChoiceEvent
from server.metrics import Metrics
from server.protocol import PromptTokensDetails, Usage


class UsageTracker:
    """Wraps a request's event stream: counts tokens per choice, records TTFT, inter-token and e2e latency.
    ``shared_prompt``: every choice continues the one prompt counted in ``prompt_tokens`` (chat), rather than each
    its own (completions count each choice's prompt)."""

    def __init__(self, metrics: Metrics | None, prompt_tokens: int, choices: int, *, shared_prompt: bool) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.shared_prompt = shared_prompt
        self.completion = [0] * choices
        self.cached = [0] * choices
        self.reasons: list[str | None] = [None] * choices
        self.started = time.monotonic()
        self._last_token: float | None = None

    async def track(self, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self._observe(event)
                    yield event
        finally:
            if self.metrics is not None:
                self.metrics.request_done(self.prompt_tokens, sum(self.completion), self.reasons,
                                          time.monotonic() - self.started)

    def _observe(self, event: ChoiceEvent) -> None:
        self.completion[event.index] = event.completion_tokens
        self.cached[event.index] = event.cached_tokens
        if event.finish_reason is not None:
            self.reasons[event.index] = event.finish_reason
        if not event.token_ids or self.metrics is None:
            return
        moment = time.monotonic()
        name = self.metrics.model_name
        if self._last_token is None:
            self.metrics.ttft.labels(name).observe(moment - self.started)
        else:
            self.metrics.inter_token.labels(name).observe(moment - self._last_token)
        self._last_token = moment

    def usage(self) -> Usage:
        completion = sum(self.completion)
        cached = max(self.cached) if self.shared_prompt else sum(self.cached)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
