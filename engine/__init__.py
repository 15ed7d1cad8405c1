"""The batched inference engine: token ids and tensors in, token ids out. Knows nothing of HTTP or chat."""

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.engine import LLM, EngineConfig, InvalidRequestError, LLMEngine, RequestOutput, StepOutput
from engine.sampling import SamplingParams
from engine.scheduler import QueueFullError, SchedulerConfig

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "EngineDeadError",
    "InvalidRequestError",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "StepOutput",
]
