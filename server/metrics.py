"""Prometheus metrics under vLLM's names, so existing dashboards and autoscalers work."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import AsyncEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)


class EngineStateCollector(Collector):
    """Read at scrape time from the engine's last published stats: requests running/waiting, KV-cache usage,
    prefix-cache and speculative-decoding counters (never from the engine's own fields)."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self):
        stats = self.engine.stats
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", stats.running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.waiting),
            ("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", stats.kv_cache_usage),
            ("qwen_serve:kv_cache_blocks_in_use", "KV-cache blocks held by requests.", stats.kv_blocks_in_use),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=list(self.labels))
            gauge.add_metric(list(self.labels.values()), value)
            yield gauge
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_hits),
            ("vllm:num_preemptions", "Sequences preempted for lack of KV-cache blocks.", stats.preemptions),
            ("vllm:spec_decode_num_drafts", "Speculative decoding: steps of a request that verified drafted tokens.",
             stats.spec_drafts),
            ("vllm:spec_decode_num_draft_tokens", "Speculative decoding: tokens drafted.", stats.spec_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens", "Speculative decoding: drafted tokens the model confirmed.",
             stats.spec_accepted_tokens),
        ):
            counter = CounterMetricFamily(name, doc, labels=list(self.labels))
            counter.add_metric(list(self.labels.values()), value)
            yield counter
        if stats.spec_accepted_per_position:
            counter = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Speculative decoding: drafted tokens the model confirmed, by position.",
                                          labels=[*self.labels, "position"])
            for position, value in enumerate(stats.spec_accepted_per_position):
                counter.add_metric([*self.labels.values(), str(position)], value)
            yield counter


class Metrics:
    """Request-level metrics recorded by the HTTP layer."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStateCollector(engine, model_name))
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", labels,
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, end to end.", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.finished = Counter("vllm:request_success", "Finished requests by reason.",
                                [*labels, "finished_reason"], registry=self.registry)
        self.pooled_tokens = Counter("qwen_serve:pooled_tokens", "Input tokens embedded or judged (--task embed, "
                                     "rerank).", [*labels, "task"], registry=self.registry)

    def pooled(self, task: str, tokens: int) -> None:
        self.pooled_tokens.labels(self.model_name, task).inc(tokens)

    def request_done(self, prompt_tokens: int, completion_tokens: int, reasons: list[str | None],
                     seconds: float) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(completion_tokens)
        self.e2e.labels(name).observe(seconds)
        for reason in reasons:
            self.finished.labels(name, reason or "abort").inc()
