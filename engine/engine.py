"""The synchronous step loop (``LLMEngine``) and the offline batch API (``LLM``)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from engine.device import select_device, select_dtype
from engine.kv_cache import BlockManager
from engine.layers import qwen_ntk_alpha
from engine.runner import ModelRunner
from engine.sampling import Sampler, SampleRequest, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.weights.loader import LoadedModel, int4_kernel_for, load_model
from tokenizer import Tokenizer

DEFAULT_CPU_KV_BYTES = 2 << 30


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class StepOutput:
    """What one step produced for one request. ``new_token_ids`` never holds the stop token that ended it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    num_cached_tokens: int


class InvalidRequestError(ValueError):
    """A request the engine cannot run (empty or too long prompt, ids outside the vocabulary)."""


class LLMEngine:
    """Owns model, cache, scheduler and sampler; ``step`` runs one batched forward pass."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.config = config or EngineConfig()
        model = loaded.model
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.max_model_len = min(self.config.max_model_len or loaded.config.max_model_len,
                                 loaded.config.max_model_len)
        num_blocks = self._num_blocks()
        self.blocks = BlockManager(num_blocks, self.config.block_size)
        self.runner = ModelRunner(model, loaded.config, num_blocks, self.config.block_size, self.device, self.dtype)
        self.scheduler = Scheduler(self.blocks, self.config.scheduler, self._cache_key)
        vocab_limit = self.tokenizer.vocab_size if self.tokenizer is not None else None
        self.sampler = Sampler(vocab_limit)
        self.vocab_size = min(vocab_limit or loaded.config.vocab_size, loaded.config.vocab_size)
        self._sequences: dict[str, Sequence] = {}

    @classmethod
    def from_model(cls, model: str | None = None, *, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, config: EngineConfig | None = None,
                   cpu_kernels: str = "native", progress=None) -> LLMEngine:
        """Load ``model`` (hub id, folder, ``.gguf``; None = the embedded default) and build an engine.
        ``cpu_kernels`` (bf16 on CPU): "native" runs the native kernels where the CPU has them (int4 x int8 linears,
        the Q8_0 head, decode attention), "torch" torch's weight-only int4 kernel (slower, closer to fp32)."""
        torch_device = select_device(device)
        torch_dtype = select_dtype(dtype, torch_device)
        kernel = int4_kernel_for(torch_device, torch_dtype, cpu_kernels)
        loaded = load_model(model, dtype=torch_dtype, device=torch_device, int4_kernel=kernel, progress=progress)
        return cls(loaded, config)

    def _num_blocks(self) -> int:
        c = self.model_config
        bytes_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:  # room for every seat at full context, at most DEFAULT_CPU_KV_BYTES
                seats = self.config.scheduler.max_num_seqs
                full_context = (self.max_model_len + self.config.block_size) * bytes_per_token
                budget = min(DEFAULT_CPU_KV_BYTES, full_context * seats)
        num_blocks = budget // (bytes_per_token * self.config.block_size)
        if num_blocks * self.config.block_size < self.max_model_len:
            raise ValueError(f"KV cache of {budget} bytes holds {num_blocks * self.config.block_size} tokens, "
                             f"fewer than max_model_len {self.max_model_len}: raise kv_cache_memory")
        return int(num_blocks)

    def _cache_key(self, seq: Sequence) -> Hashable:
        return seq.ntk_alpha

    # -- requests --------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Queue a request; raises ``InvalidRequestError`` or ``QueueFullError``."""
        if request_id in self._sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        prompt = list(prompt_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(prompt)} tokens; this model's context is "
                                      f"{self.max_model_len} tokens")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        stop_ids = set(params.stop_token_ids)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        if eos is not None and not params.ignore_eos:
            stop_ids.add(eos)
        room = self.max_model_len - len(prompt)
        c = self.model_config
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt,
            params=params,
            stop_ids=frozenset(stop_ids),
            max_tokens=min(params.max_tokens or room, room),
            ntk_alpha=qwen_ntk_alpha(len(prompt), c.seq_length) if c.use_dynamic_ntk else 1.0,
            generator=None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed),
        )
        self.scheduler.add(seq)
        self._sequences[request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False when it is unknown or already finished."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def prompt_logits(self, prompt_ids: Seq[int]) -> torch.Tensor:
        """fp32 logits at every position of ``prompt_ids`` from one forward pass (nothing cached is reused)."""
        c = self.model_config
        seq = Sequence("prompt-logits", list(prompt_ids), SamplingParams(), frozenset(), 1,
                       ntk_alpha=qwen_ntk_alpha(len(prompt_ids), c.seq_length) if c.use_dynamic_ntk else 1.0)
        if not self.blocks.allocate(seq, share=False):
            raise InvalidRequestError("not enough free KV-cache blocks for this prompt")
        try:
            return self.runner.run([seq], all_logits=True)
        finally:
            self.blocks.free(seq)

    # -- the step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.run(batch)
        rows = [SampleRequest(s.params, s.prompt_ids, s.output_ids, s.stop_ids, s.generator, s.matcher)
                for s in batch]
        result = self.sampler(logits, rows)
        outputs = []
        for seq, token, logprobs in zip(batch, result.token_ids, result.logprobs, strict=True):
            seq.num_computed = len(seq)
            seq.output_ids.append(token)
            reason = None
            # A token its grammar refuses can only come from a row with nothing allowed left: that ends it too.
            if token in seq.stop_ids or (seq.matcher is not None and not seq.matcher.accept_token(token)):
                reason = "stop"
            elif len(seq.output_ids) >= seq.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
            visible = [] if reason == "stop" else [token]
            if logprobs is not None and visible:
                seq.logprobs.append(logprobs)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self._sequences[seq.request_id]
            outputs.append(StepOutput(
                request_id=seq.request_id,
                new_token_ids=visible,
                new_logprobs=[logprobs] if logprobs is not None and visible else [],
                finished=reason is not None,
                finish_reason=reason,
                num_prompt_tokens=len(seq.prompt_ids),
                num_output_tokens=len(seq.output_ids),
                num_cached_tokens=seq.num_cached_prompt_tokens,
            ))
        return outputs


class LLM:
    """Offline batch generation: ``LLM(model).generate(prompts, params)``, shaped like vLLM's."""

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, config: EngineConfig | None = None,
                 cpu_kernels: str = "native") -> None:
        self.engine = LLMEngine.from_model(model, dtype=dtype, device=device, config=config, cpu_kernels=cpu_kernels)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt (strings need a tokenizer; lists of ints are token ids), in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        sequences: list[tuple[str, list[int]]] = []
        for prompt, request_params in zip(prompts, params_list, strict=True):
            ids = self._encode(prompt)
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, request_params)
            sequences.append((request_id, ids))
        collected: dict[str, RequestOutput] = {
            rid: RequestOutput(rid, ids, [], None, None, None, 0) for rid, ids in sequences
        }
        while self.engine.has_unfinished():
            for out in self.engine.step():
                record = collected[out.request_id]
                record.token_ids += out.new_token_ids
                if out.new_logprobs:
                    record.logprobs = (record.logprobs or []) + out.new_logprobs
                if out.finished:
                    record.finish_reason = out.finish_reason
                    record.num_cached_tokens = out.num_cached_tokens
        results = [collected[rid] for rid, _ in sequences]
        if self.tokenizer is not None:
            for record in results:
                record.text = self.tokenizer.decode(record.token_ids)
        return results

    def _encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, allow_special=True)
        return list(prompt)


__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "StepOutput"]
