"""One Settings object from CLI flags, ``QWEN_SERVE_*`` environment variables and a YAML file (in that order)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from engine import EngineConfig, SchedulerConfig
from server.tool_formats import FORMATS

_SCHEDULER = SchedulerConfig()  # the engine's defaults are the one source of these
_ENGINE = EngineConfig()
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: Any) -> int | None:
    """``2GiB``, ``512M``, ``1e9`` or a plain integer."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(float(text))


class GenerationDefaults(BaseModel):
    """What requests that leave a sampling field out get, over the model's own generation config."""

    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    max_new_tokens: int | None = Field(default=None, ge=1)

    def over(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with these values in place (a set temperature samples, or is greedy at 0)."""
        given = self.model_dump(exclude_none=True)
        return {**config, **given, **({"do_sample": True} if "temperature" in given else {})}


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the server. Each is a ``--flag``, a ``QWEN_SERVE_FLAG`` variable and a YAML key."""

    model_config = SettingsConfigDict(env_prefix="QWEN_SERVE_", extra="forbid", validate_default=True)

    model: str | None = Field(default=None, description="hub id, local folder or .gguf file; default: embedded")
    served_model_name: str | None = Field(default=None,
                                          description="name clients use (default: the model file's stem or folder)")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted Bearer keys")
    open_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health"],
        description="paths served without a key (add /metrics to let a scraper in without one)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ui: bool = Field(default=True, description="the chat page at / (its assets under /playground/)")
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=_SCHEDULER.max_num_seqs, ge=1)
    max_num_batched_tokens: int = Field(default=_SCHEDULER.max_num_batched_tokens, ge=16)
    max_waiting: int = Field(default=_SCHEDULER.max_waiting, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="split the model over this many processes "
                                      "(gloo on CPU, NCCL on CUDA: one GPU each); MASTER_ADDR/MASTER_PORT/WORLD_SIZE "
                                      "set: the other ranks join from other nodes (python -m engine.tp_worker)")
    dtype: str = "auto"
    device: str = "auto"
    cpu_isa: Literal["auto", "amx", "avx512", "avx2", "torch"] = Field(
        default="auto", description="4-bit weights on a bf16 CPU: the native int4 x int8 kernels built for amx "
        "(avx512's, with the products of several rows on AMX tiles), avx512 or avx2 (auto: the fastest this CPU "
        "runs), or torch's weight-only kernel (bf16 activations)")
    quantization: Literal["none", "q8_0", "q4_0", "q4_k"] = Field(
        default="none", description="quantize a dense checkpoint folder's layers while loading (native CPU kernels; "
        "the bytes llama-quantize writes; q4_k: Q8_0 for rows that are not whole 256-value blocks)")
    kv_cache_memory: int | None = Field(default=None, description="bytes for the KV cache, e.g. 2GiB")
    cuda_int4_kernel: Literal["auto", "tinygemm", "triton"] = Field(
        default="auto", description="4-bit GPTQ/AWQ weights on CUDA: torch's tinygemm (fastest at batch 1; bf16, "
        "sm80+) or the Triton kernels (about twice tinygemm's throughput at 64 streams); auto: tinygemm where it runs")
    kv_cache_dtype: Literal["auto", "int8", "fp8"] = Field(
        default=_ENGINE.kv_cache_dtype, description="keys and values in the model's dtype, or int8 or fp8 (e4m3; CUDA "
        "sm89+, or CPU without the native decode kernel) with a scale per token and head (~1.9x the tokens of bf16 at "
        "the same memory)")
    state_snapshots: int = Field(
        default=_ENGINE.state_snapshots, ge=0, le=4096, description="hybrid models (Qwen3.5, Qwen3-Next): cached "
        "prefixes whose linear-layer states are kept, so a shared prompt resumes where it ended (each the size of one "
        "sequence's states, taken from the KV cache budget; 0: prefixes are recomputed)")
    speculative: Literal["none", "mtp"] = Field(
        default="none", description="speculative decoding: mtp drafts tokens with the checkpoint's own "
        "multi-token-prediction block (Qwen3.5, Qwen3-Next: mtp.* weights, or a GGUF file's nextn block) and each "
        "step verifies them; the tokens are those the model gives without it")
    num_speculative_tokens: int = Field(default=2, ge=1, le=8, description="with --speculative: tokens drafted a "
                                        "step for each decoding request")
    enforce_eager: bool = Field(default=_ENGINE.enforce_eager,
                                description="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    task: Literal["auto", "generate", "embed", "rerank"] = Field(
        default="auto", description="what the model serves: chat and text completions; embeddings "
        "(/v1/embeddings: its final hidden states pooled by --pooling, L2-normalised); or rerank scores (/v1/rerank: "
        "a Qwen3-Reranker's yes/no judgement); auto: what the checkpoint declares (a sentence-transformers folder, "
        "a GGUF pooling type), else generate")
    pooling: Literal["auto", "last", "mean", "cls"] = Field(
        default="auto", description="embeddings: the last token's state (Qwen3-Embedding), the mean over the "
        "input's tokens, or the first token's; auto: what the checkpoint declares, else last")
    tool_call_format: str = Field(default="auto", description="how the model writes function calls: "
                                  f"{', '.join(FORMATS)} (auto: read from its chat template)")
    enable_thinking: bool = Field(default=True, description="thinking models think unless a request turns it off "
                                  "(chat_template_kwargs.enable_thinking, reasoning_effort none)")
    override_generation_config: GenerationDefaults = Field(
        default_factory=GenerationDefaults, description="JSON over the model's generation config: temperature, "
        "top_p, top_k, repetition_penalty, max_new_tokens (what a request that leaves a field out gets)")
    clamp_max_tokens: bool = Field(default=True, description="a max_tokens beyond what the context leaves after "
                                   "the prompt is cut to it (the reply ends with 'length'); off: a 400, as OpenAI "
                                   "answers")
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="other model names the served model answers to (* for any name): "
        "clients that ask for their own model names, e.g. Claude Code's tiers")
    response_store_bytes: int = Field(default=128 << 20, ge=0, description="Responses API: bytes of stored "
                                      "responses (store: true) kept for previous_response_id; oldest evicted first")
    response_store_age: float = Field(default=86400.0, gt=0, description="Responses API: seconds a stored "
                                      "response is kept")
    max_request_bytes: int = Field(default=8 << 20, ge=1024, description="larger bodies get 413")
    max_messages: int = Field(default=1024, ge=1, description="messages in one chat request")
    max_tools: int = Field(default=128, ge=0, description="tools or functions in one chat request")
    max_prompt_choices: int = Field(default=64, ge=1, description="completions: prompts times n in one request")
    max_embedding_inputs: int = Field(default=2048, ge=1, description="embeddings: inputs in one request")
    max_rerank_documents: int = Field(default=1024, ge=1, description="rerank: documents in one request")
    max_prompt_chars: int | None = Field(default=None, ge=1, description="characters of text in one request's "
                                         "prompt (contents, call arguments, tool descriptions), checked before it is "
                                         "tokenized; default: 16 per token of the context")
    max_logit_bias: int = Field(default=1024, ge=0, description="logit_bias entries in one request")
    max_stop: int = Field(default=16, ge=0, description="stop strings in one request")
    max_stop_chars: int = Field(default=256, ge=1, description="characters in one stop string")
    max_schema_bytes: int = Field(default=32 << 10, ge=64, description="one JSON schema, serialized")
    max_schema_depth: int = Field(default=32, ge=2, description="nesting of objects and arrays in one JSON schema")
    max_schema_refs: int = Field(default=128, ge=0, description="$ref keywords in one JSON schema")
    max_schema_repeat: int = Field(default=512, ge=1, description="bounds in a JSON schema: minLength, maxLength, "
                                   "minItems, maxItems, minProperties, maxProperties")
    prep_workers: int = Field(default=2, ge=1, description="threads that validate, render and tokenize requests")
    prep_timeout: float = Field(default=30.0, gt=0, description="seconds a request may take to prepare (else 408)")
    grammar_workers: int = Field(default=1, ge=1, description="processes that compile grammars")
    grammar_timeout: float = Field(default=10.0, gt=0, description="seconds to compile one grammar (else 400)")
    grammar_cache_bytes: int = Field(default=256 << 20, ge=0, description="xgrammar's cache in each grammar process")
    drain_timeout: float = Field(default=30.0, ge=0, description="seconds to finish requests on SIGTERM")
    log_level: str = "info"

    @field_validator("api_key", "open_paths", "cors_origins", "model_aliases", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("tool_call_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "auto" and value not in FORMATS:
            raise ValueError(f"tool_call_format must be auto or one of {', '.join(FORMATS)}")
        return value

    @field_validator("kv_cache_memory", "max_request_bytes", "max_schema_bytes", "grammar_cache_bytes",
                     "response_store_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return parse_bytes(value)

    @property
    def speculative_tokens(self) -> int:
        """Tokens drafted a step (0: no speculative decoding)."""
        return self.num_speculative_tokens if self.speculative == "mtp" else 0

    @property
    def model_name(self) -> str:
        """``--served-model-name``; else a local model's file stem or folder name (as llama-server names it; never
        a path of this host), a hub id as given, or the embedded model's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return "SmolLM2-135M-Instruct"
        path = Path(self.model).expanduser()
        if path.suffix == ".gguf" or path.exists() or self.model.startswith((".", "/", "~")):
            return path.stem if path.suffix == ".gguf" else path.name
        return self.model


def load_settings(overrides: dict[str, Any] | None = None, config_file: str | Path | None = None) -> Settings:
    """Flags (``overrides``) win over the environment, which wins over the YAML file."""

    class LayeredSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                       init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource,
                                       dotenv_settings: PydanticBaseSettingsSource,
                                       file_secret_settings: PydanticBaseSettingsSource):
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config_file is not None:
                if not Path(config_file).is_file():
                    raise FileNotFoundError(f"config file {config_file} does not exist")
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
            return tuple(sources)

    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Settings.model_validate(LayeredSettings(**values).model_dump())
