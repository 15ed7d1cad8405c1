"""The synchronous step loop (``LLMEngine``) and the offline batch API (``LLM``)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Hashable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from engine.cuda_graphs import CudaGraphCapture, DecodeGraphs
from engine.device import on_card, reads_fp8, select_device, select_dtype
from engine.kv_cache import BlockManager
from engine.kv_store import kv_bytes_per_token
from engine.layers import qwen_ntk_alpha
from engine.linear_attention import state_bytes_per_sequence
from engine.pooling import POOLINGS, PooledPrompt, PoolingJob, PoolingTask, pool_chunk
from engine.runner import DraftRows, ModelRunner
from engine.sampling import PenaltyState, Sampler, SampleRequest, SampleResult, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, Status
from engine.state_slots import StateSlots
from engine.tensor_parallel import Leader, worker_device
from engine.transfer import to_device
from engine.weights.loader import LoadedModel, int4_kernel_for, load_model
from tokenizer import Tokenizer

DEFAULT_CPU_KV_BYTES = 2 << 30
PROMPT_LOGPROB_ROWS = 128  # prompt positions turned into fp32 logits at once (never a whole [T, vocab] copy)

log = logging.getLogger("qwen_serve.engine")
Pick = tuple[int, dict[int, float] | None] | str  # a row's sampled token and its logprobs, or why it failed


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enforce_eager: bool = False  # CUDA: no graphs for decode steps
    kv_cache_dtype: str = "auto"  # "int8"/"fp8": keys and values in 8 bits with a scale per slot and head
    state_snapshots: int = 8  # hybrid models: cached prefixes' linear-layer states kept (from the cache budget)
    speculative_tokens: int = 0  # tokens the multi-token-prediction block drafts a step for each decoding sequence

    def __post_init__(self) -> None:
        if self.speculative_tokens < 0:
            raise ValueError("speculative_tokens must be 0 (off) or more")
        rows = self.scheduler.max_num_seqs * (self.speculative_tokens + 1)
        if self.speculative_tokens and self.scheduler.max_num_batched_tokens <= rows:
            raise ValueError(f"max_num_batched_tokens ({self.scheduler.max_num_batched_tokens}) must exceed "
                             f"max_num_seqs x (speculative tokens + 1) ({rows}): every running sequence verifies its "
                             "drafted tokens in each step")


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
    error: str | None = None
    pooled: torch.Tensor | None = None  # a finished pooling request's rows (``LLMEngine.add_pooling``)


@dataclass(frozen=True)
class ModelInfo:
    """What code outside the engine thread may know of the loaded model: fixed at load, safe to read anywhere."""

    tokenizer: Tokenizer | None
    max_model_len: int
    vocab_size: int
    logits_width: int
    generation_config: Mapping[str, Any]
    max_num_seqs: int
    max_waiting: int
    hidden_size: int = 0
    max_num_batched_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, taken on the engine thread."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_blocks_in_use: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    spec_drafts: int = 0  # speculative decoding: rows that verified drafted tokens,
    spec_draft_tokens: int = 0  # the tokens drafted for them,
    spec_accepted_tokens: int = 0  # and those the model's own choice confirmed,
    spec_accepted_per_position: tuple[int, ...] = ()  # by position among a row's drafts (the first, the second...)


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

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, leader: Leader | None = None) -> None:
        """``leader``: the model is split over processes (``engine.tensor_parallel``), this one rank 0."""
        self.loaded = loaded
        model = loaded.model
        self.model_config = model.config  # this rank's shapes (the whole model's unless split)
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.config = config or EngineConfig()
        self.leader = leader
        self.device = model.device
        self.dtype = model.dtype
        self.max_model_len = min(self.config.max_model_len or loaded.config.max_model_len,
                                 loaded.config.max_model_len)
        if self.config.max_model_len and self.config.max_model_len > loaded.config.max_model_len:
            log.warning("max_model_len %d is more than this model supports: serving %d tokens of context (the "
                        "model's max_position_embeddings)", self.config.max_model_len, loaded.config.max_model_len)
        if self.config.kv_cache_dtype == "fp8" and not reads_fp8(self.device):
            raise ValueError("kv_cache_dtype fp8 needs a CUDA card that reads fp8 (sm89: Ada, Hopper and later); "
                             "use int8 on this one")
        self.drafted = self.config.speculative_tokens
        if self.drafted and model.mtp is None:
            raise ValueError("speculative decoding needs the model built with its multi-token-prediction block "
                             "(load it with speculative='mtp')")
        self.states = (StateSlots(self.config.scheduler.max_num_seqs, self.config.state_snapshots, self.drafted + 1)
                       if self.model_config.hybrid else None)
        if self.drafted:
            log.info("speculative decoding: the multi-token-prediction block drafts %d tokens a step; running "
                     "sequences' states take %.2f GiB (%d slots a seat)", self.drafted,
                     self.state_bytes(running=True) / 2**30, self.drafted + 1 if self.states is not None else 0)
        num_blocks = self._num_blocks()
        self.blocks = BlockManager(num_blocks, self.config.block_size,
                                   self.states.resumable if self.states is not None else None)
        self.runner = ModelRunner(model, model.config, num_blocks, self.config.block_size, self.device, self.dtype,
                                  self.config.kv_cache_dtype,
                                  state_slots=self.states.total if self.states is not None else 0)
        if leader is not None:
            leader.setup(num_blocks, self.config.block_size, self.config.kv_cache_dtype)
            self.runner.followers = leader
        self._use_cuda_kernels()
        self.scheduler = Scheduler(self.blocks, self.config.scheduler, self._cache_key, self.states)
        vocab_limit = self.tokenizer.vocab_size if self.tokenizer is not None else None
        self.sampler = Sampler(vocab_limit)
        self.vocab_size = min(vocab_limit or loaded.config.vocab_size, loaded.config.vocab_size)
        self._sequences: dict[str, Sequence] = {}
        self._jobs: dict[str, PoolingJob] = {}
        self._backlog: deque[PoolingJob] = deque()  # pooling jobs with prompts not yet handed to the scheduler
        self.speculation = SpeculationCounts()
        scheduler = self.config.scheduler
        self.info = ModelInfo(self.tokenizer, self.max_model_len, self.vocab_size, loaded.config.vocab_size,
                              MappingProxyType(dict(loaded.generation_config)), scheduler.max_num_seqs,
                              scheduler.max_waiting, loaded.config.hidden_size, scheduler.max_num_batched_tokens)

    def stats(self) -> EngineStats:
        """The engine's load now (call on the thread that steps it)."""
        blocks = self.blocks
        spec = self.speculation
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), blocks.usage,
                           blocks.num_blocks - blocks.num_free, blocks.prefix_queries, blocks.prefix_hits,
                           self.scheduler.num_preemptions, spec.drafts, spec.draft_tokens, spec.accepted_tokens,
                           tuple(spec.per_position))

    @classmethod
    def from_model(cls, model: str | None = None, *, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, config: EngineConfig | None = None,
                   cpu_isa: str = "auto", cuda_int4_kernel: str = "auto", progress=None,
                   tensor_parallel_size: int = 1, quantization: str | None = None) -> LLMEngine:
        """Load ``model`` (hub id, folder, ``.gguf``; None = the embedded default) and build an engine.
        ``cpu_isa`` (bf16 on CPU): "amx", "avx512" or "avx2" runs that build of the native kernels (int4 x int8
        linears, the Q8_0 head, decode attention; amx: avx512's, with the products of several rows on AMX tiles),
        "auto" the fastest build the CPU runs, "torch" torch's weight-only int4 kernel
        (slower, closer to fp32). ``cuda_int4_kernel``: 4-bit weights on CUDA on "tinygemm" (fastest at batch 1) or
        "triton" (more throughput at many streams); "auto" tinygemm where it runs. ``tensor_parallel_size`` > 1
        splits the model over that many processes (this one rank 0; ``engine.tensor_parallel``). ``quantization``
        ("q8_0", "q4_0", "q4_k"): a dense checkpoint's layers quantized while loading, for the native CPU kernels.
        ``config.speculative_tokens`` > 0 builds the model with its multi-token-prediction block, which drafts
        them."""
        torch_device = select_device(device)
        speculative = "mtp" if config is not None and config.speculative_tokens else None
        torch_dtype = select_dtype(dtype, torch_device)
        if tensor_parallel_size > 1:
            if quantization is not None or speculative is not None:
                raise ValueError("--quantization and --speculative run in one process: drop --tensor-parallel-size")
            leader = Leader.start(model, torch_dtype, torch_device, tensor_parallel_size)
            try:
                loaded = load_model(model, dtype=torch_dtype, device=worker_device(torch_device, 0),
                                    progress=progress, shard=leader.shard)
                return cls(loaded, config, leader)
            except BaseException:
                leader.abandon()
                raise
        kernel = int4_kernel_for(torch_device, torch_dtype, cpu_isa, dtype_chosen=dtype in (None, "auto"),
                                 cuda_kernel=cuda_int4_kernel)
        loaded = load_model(model, dtype=torch_dtype, device=torch_device, int4_kernel=kernel, progress=progress,
                            quantization=quantization, speculative=speculative)
        return cls(loaded, config)

    def close(self) -> None:
        """Stop the other ranks of a split model (nothing to do otherwise)."""
        if self.leader is not None:
            self.leader.close()
            self.leader = None

    def _use_cuda_kernels(self) -> None:
        """On CUDA, the model's Triton kernels (``DecoderModel.use_triton_kernels``) and, unless ``enforce_eager``,
        decode steps replayed from CUDA graphs."""
        model = self.runner.model
        if not on_card(self.device):
            return
        model.use_triton_kernels(self.config.block_size)
        if not model.uses_paged_decode:
            return
        if not self.config.enforce_eager and model.graph_safe and self.leader is None:
            self.runner.use_decode_graphs(DecodeGraphs(self.runner, self.config.scheduler.max_num_seqs,
                                                       self.max_model_len, CudaGraphCapture(self.device)))

    def _num_blocks(self) -> int:
        bytes_per_token = kv_bytes_per_token(self.model_config, self.dtype, self.config.kv_cache_dtype)
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85) - self.state_bytes(running=True)
            else:  # room for every seat at full context, at most DEFAULT_CPU_KV_BYTES
                seats = self.config.scheduler.max_num_seqs
                full_context = (self.max_model_len + self.config.block_size) * bytes_per_token
                budget = min(DEFAULT_CPU_KV_BYTES, full_context * seats)
        budget -= self.state_bytes(running=False)  # prefix snapshots share the cache budget with the blocks
        num_blocks = max(budget, 0) // (bytes_per_token * self.config.block_size)
        if num_blocks * self.config.block_size < self.max_model_len:
            raise ValueError(f"KV cache of {budget} bytes holds {num_blocks * self.config.block_size} tokens, "
                             f"fewer than max_model_len {self.max_model_len}: raise kv_cache_memory"
                             + (" or lower state_snapshots" if self.states is not None else ""))
        return int(num_blocks)

    def state_bytes(self, running: bool) -> int:
        """Bytes a hybrid model's linear-layer states take: the seats' and the prompt passes' (``running``), or the
        prefix snapshots'; 0 for other models."""
        if self.states is None:
            return 0
        slots = self.states.running_slots + 1 if running else self.states.snapshots
        return slots * state_bytes_per_sequence(self.model_config)

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
        try:
            params.check_vocabulary(self.vocab_size)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
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
            ntk_alpha=self._ntk_alpha(prompt),
            generator=None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed),
            penalties=PenaltyState(params, prompt, (), frozenset(stop_ids), c.vocab_size, self.device),
        )
        self.scheduler.add(seq)
        self._sequences[request_id] = seq

    def add_pooling(self, request_id: str, prompts: Seq[Seq[int]], task: PoolingTask) -> None:
        """Queue a pooling request: each prompt becomes a prefill-only sequence of the continuous batch, handed to
        the scheduler when a seat is free and no other request waits for one; the step that computes the last of
        them returns a ``StepOutput`` whose ``pooled`` holds a row per prompt, in order (``PoolingTask``). Raises
        ``InvalidRequestError``."""
        if request_id in self._sequences or request_id in self._jobs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if task.kind == "embed" and task.pooling not in POOLINGS:
            raise InvalidRequestError(f"pooling must be one of {', '.join(POOLINGS)}")
        if task.kind == "logits" and not all(0 <= t < self.model_config.vocab_size for t in task.token_ids):
            raise InvalidRequestError("the answer tokens must be in the vocabulary")
        checked = [self._passable(prompt) for prompt in prompts]
        if not checked:
            raise InvalidRequestError("there is nothing to pool")
        job = PoolingJob(request_id, task, checked)
        self._jobs[request_id] = job
        self._backlog.append(job)

    def _admit_pooling(self) -> None:
        """Hand queued pooling prompts to the scheduler while seats are free for them (a request waiting for a
        seat goes first)."""
        scheduler, seats = self.scheduler, self.config.scheduler.max_num_seqs
        while self._backlog and len(scheduler.running) + len(scheduler.waiting) < seats:
            job = self._backlog[0]
            index = job.admitted
            seq = self._prefill_only(f"{job.request_id}/{index}", job.prompts[index], PooledPrompt(job, index))
            scheduler.add(seq)
            job.live.append(seq)
            job.admitted += 1
            if job.admitted == len(job.prompts):
                self._backlog.popleft()

    def _passable(self, prompt_ids: Seq[int]) -> list[int]:
        """``prompt_ids`` as a list, or ``InvalidRequestError`` when a prompt-only pass cannot run it."""
        prompt = list(prompt_ids)
        if not prompt or len(prompt) > self.max_model_len or min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(f"a prompt must have 1 to {self.max_model_len} ids in [0, {self.vocab_size})")
        return prompt

    def _prefill_only(self, request_id: str, prompt: list[int], pool: PooledPrompt | None = None) -> Sequence:
        """A sequence that computes ``prompt`` and samples nothing (a pooling request's prompt, a prompt pass)."""
        return Sequence(request_id, prompt, SamplingParams(), frozenset(), 1, ntk_alpha=self._ntk_alpha(prompt),
                        pool=pool)

    def _ntk_alpha(self, prompt: list[int]) -> float:
        """Qwen-1's dynamic-NTK alpha for a sequence starting with ``prompt`` (1 for other models)."""
        c = self.model_config
        return qwen_ntk_alpha(len(prompt), c.seq_length) if c.use_dynamic_ntk else 1.0

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False when it is unknown or already finished."""
        job = self._jobs.pop(request_id, None)
        if job is not None:
            self._drop(job)
            return True
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def _drop(self, job: PoolingJob) -> None:
        """End ``job``'s sequences and forget its prompts not yet admitted."""
        for seq in job.live:
            self.scheduler.finish(seq, "abort")
        job.live.clear()
        if job in self._backlog:
            self._backlog.remove(job)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._backlog)

    def prompt_logits(self, prompt_ids: Seq[int]) -> torch.Tensor:
        """fp32 logits at every position of ``prompt_ids`` from one forward pass (nothing cached is reused)."""
        with self._prompt_pass(prompt_ids):
            return self.runner.head()

    def prompt_logprobs(self, prompt_ids: Seq[int], top: int) -> list[dict[int, float] | None]:
        """Log-probability of each prompt token given the ones before it, with the ``top`` most likely (the first
        token has none). Logits are made ``PROMPT_LOGPROB_ROWS`` positions at a time."""
        ids = list(prompt_ids)
        entries: list[dict[int, float] | None] = [None]
        if len(ids) < 2:
            return entries
        with self._prompt_pass(ids):  # the whole prompt: Qwen-1's NTK alpha depends on its length
            for start in range(0, len(ids) - 1, PROMPT_LOGPROB_ROWS):
                rows = self.runner.head(slice(start, start + PROMPT_LOGPROB_ROWS))
                logprobs = rows[:, : self.vocab_size].log_softmax(-1)
                targets = torch.tensor(ids[start + 1 : start + 1 + rows.shape[0]], device=rows.device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                top_values, top_ids = logprobs.topk(top) if top else (None, None)
                for row, token in enumerate(targets.tolist()):
                    entry = {token: chosen[row]}
                    if top_ids is not None:
                        entry.update(zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True))
                    entries.append(entry)
        return entries

    @contextlib.contextmanager
    def _prompt_pass(self, prompt_ids: Seq[int]):
        """The last layer's output at every position of the prompt, in cache blocks held for the pass (a hybrid
        model's states in its pass slot)."""
        seq = self._prefill_only("prompt-pass", self._passable(prompt_ids))
        if not self.blocks.allocate(seq, share=False):
            raise InvalidRequestError("not enough free KV-cache blocks for this prompt")
        seq.state_slot = self.states.pass_slot if self.states is not None else None
        try:
            with torch.inference_mode():
                yield self.runner.hidden([seq])
        finally:
            self.blocks.free(seq)

    # -- the step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One batched forward pass and a token for every scheduled sequence whose tokens are all computed (a chunk
        of a long prompt samples nothing). A failure in one row's sampling or grammar ends that request
        (``finish_reason`` "error") and no other; a failure of the forward pass itself is not any one request's
        and propagates."""
        self._admit_pooling()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        rows = [row for row, seq in enumerate(batch) if not seq.prefilling and seq.pool is None]
        hidden, ends, starts = None, [], []
        if self.drafted or any(seq.pool is not None for seq in batch):
            starts = [seq.num_computed for seq in batch]
            ends = list(itertools.accumulate(seq.step_end - seq.num_computed for seq in batch))
            hidden = self.runner.hidden(self._step_rows(batch))
            # every sampled row's last token, and before it any drafted ones it verifies
            head_rows = [ends[row] - 1 - len(batch[row].draft_ids) + j for row in rows
                         for j in range(len(batch[row].draft_ids) + 1)]
            logits = self.runner.head(head_rows) if rows else None
        else:
            logits = self.runner.run(batch)
            logits = self._rows_of(logits, rows) if rows else None
        if self.states is not None:  # the step restored and kept the states it was told to
            self.states.commit()
            for seq in batch:
                self.states.restored(seq)
        pooled = self._pool(batch, hidden, ends) if hidden is not None else []
        outputs = self._sample(batch, logits, rows) if logits is not None else []
        for seq in batch:
            if seq.prefilling:
                seq.num_computed = seq.step_end
        if self.drafted:
            assert hidden is not None
            self._draft(batch, hidden, [0, *ends[:-1]], starts)
        return outputs + pooled

    def _step_rows(self, batch: list[Sequence]) -> list[Sequence | DraftRows]:
        """The runner's rows for ``batch``: each sequence, or for one verifying drafted tokens a row per token
        (attention then reads each as a decode row; a hybrid model's linear layers advance them in rounds, each
        token's state kept in a slot of the sequence's group: ``StateSlots.round_slots``). Packed the same."""
        rows: list[Sequence | DraftRows] = []
        for seq in batch:
            if not seq.draft_ids:
                rows.append(seq)
                continue
            position, count = seq.num_computed, len(seq.draft_ids) + 1
            tokens = [seq.token_at(position), *seq.draft_ids]
            targets = self.states.round_slots(seq, count) if self.states is not None else None
            for j, token in enumerate(tokens):
                states = None if targets is None else (
                    targets[j], -1, -1, -1, targets[j - 1] if j else seq.state_slot, j)
                rows.append(DraftRows(position + j, position + j + 1, [token], seq.block_table, seq.ntk_alpha,
                                      states))
        return rows

    def _pool(self, batch: list[Sequence], hidden: torch.Tensor, ends: list[int]) -> list[StepOutput]:
        """Each pooling sequence's chunk folded into its pooling (``hidden``: the step's last-layer output, packed;
        ``ends``: where each row's tokens end in it); the sequences whose prompt this step completes finish, and so
        does each job whose rows are then all there (or that failed: its other sequences end with it)."""
        outputs = []
        for seq, end in zip(batch, ends, strict=True):
            target = seq.pool
            if target is None or target.job.request_id not in self._jobs:
                continue
            job = target.job
            try:
                if job.task.kind == "logits":
                    row = None if seq.prefilling else self._answer_logits(hidden, end - 1, job.task.token_ids)
                else:
                    row = pool_chunk(self.runner.model, seq, hidden[end - (seq.step_end - seq.num_computed) : end])
            except Exception as exc:
                log.warning("pooling request %s failed", job.request_id, exc_info=True)
                outputs.append(self._end_job(job, f"pooling failed for this request: {exc!r}"))
                continue
            if row is None:
                continue
            job.rows[target.index] = row
            job.live.remove(seq)
            self.scheduler.finish(seq, "stop")
            if job.done:
                outputs.append(self._end_job(job))
        return outputs

    def _answer_logits(self, hidden: torch.Tensor, index: int, token_ids: tuple[int, ...]) -> torch.Tensor:
        """fp32 logits of ``token_ids`` at packed row ``index`` of the step (a split head gathers whole rows)."""
        if self.leader is not None:
            return self.runner.head([index])[0, list(token_ids)]
        return self.runner.model.token_logits(hidden[index : index + 1], token_ids)[0]

    def _end_job(self, job: PoolingJob, error: str | None = None) -> StepOutput:
        del self._jobs[job.request_id]
        if error is not None:
            self._drop(job)
        return StepOutput(request_id=job.request_id, new_token_ids=[], new_logprobs=[], finished=True,
                          finish_reason="error" if error is not None else "stop", num_prompt_tokens=job.tokens,
                          num_output_tokens=0, num_cached_tokens=0, error=error,
                          pooled=None if error is not None else job.result())

    def _sample(self, batch: list[Sequence], logits: torch.Tensor, rows: list[int]) -> list[StepOutput]:
        """Tokens for ``batch``'s ``rows`` (the sequences whose tokens are all computed; ``logits``: theirs, in that
        order, with a row before the last for each token a sequence drafted). A sequence verifying drafted tokens
        samples in rounds, as it would have one step at a time: round j samples its j-th row, with its state (output,
        penalties, grammar, random stream) after the rounds before, and it goes on while the token sampled is the one
        drafted. A greedy sequence thus gets the tokens it would without drafts, a sampling one tokens of the same
        distribution (a drafted token stands exactly when the model samples it)."""
        sampled = [batch[row] for row in rows]
        drafts = [seq.draft_ids for seq in sampled]
        firsts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))
        outputs: list[StepOutput | None] = [None] * len(sampled)
        accepted = [0] * len(sampled)
        active, j = list(range(len(sampled))), 0
        while active:
            picks = self._round(logits if j == 0 and firsts[-1] == len(sampled) else
                                logits[to_device([firsts[i] + j for i in active], torch.long, logits.device)],
                                [sampled[i] for i in active], batch, rows)
            going = []
            for i, pick in zip(active, picks, strict=True):
                out = self._advance(sampled[i], pick)
                outputs[i] = out if outputs[i] is None else merged(outputs[i], out)
                if j < len(drafts[i]) and not isinstance(pick, str) and pick[0] == drafts[i][j]:
                    accepted[i] += 1
                    if not out.finished:
                        going.append(i)
            active, j = going, j + 1
        for seq, drafted, count in zip(sampled, drafts, accepted, strict=True):
            if drafted:
                self._accepted(seq, drafted, count)
        return [out for out in outputs if out is not None]

    def _round(self, logits: torch.Tensor, sequences: list[Sequence], batch: list[Sequence],
               rows: list[int]) -> list[Pick]:
        """A token for each of ``sequences`` from its row of ``logits``; when the batch fails, each row alone."""
        requests = [SampleRequest(s.params, s.prompt_ids, s.output_ids, s.stop_ids, s.generator, s.matcher,
                                  s.penalties) for s in sequences]
        # a hybrid model's step advanced its states, and a step with drafts its cache: it cannot run again
        kept = logits.clone() if self.states is not None or self.drafted else None
        try:
            return list(self._picks(self.sampler(logits, requests)))
        except Exception:
            log.warning("sampling a batch of %d failed; sampling its rows one by one", len(requests), exc_info=True)
            return self._sample_rows_alone(batch, rows, requests, kept)

    def _accepted(self, seq: Sequence, drafted: list[int], accepted: int) -> None:
        """``seq`` verified ``drafted`` tokens and the first ``accepted`` stood: count them, and a hybrid model's
        sequence takes up the states after them (kept by that round: ``StateSlots.round_slots``)."""
        self.speculation.record(len(drafted), accepted)
        if seq.status is Status.RUNNING and self.states is not None:
            seq.state_slot = self.states.round_slots(seq, len(drafted) + 1)[accepted]
        seq.draft_ids = []

    def _draft(self, batch: list[Sequence], hidden: torch.Tensor, packed_starts: list[int],
               positions: list[int]) -> None:
        """The multi-token-prediction block over every row this step computed and kept (``hidden``: the step's
        last-layer output, each sequence's rows from ``packed_starts``, its first at ``positions``), which writes
        its keys; each sequence that sampled drafts up to ``speculative_tokens`` tokens for its next step to verify
        (greedy from the block's logits, read back as the sampler reads its tokens; the first from the model's hidden
        state, each next from the block's own output), as many as its token budget, context and free cache blocks
        allow."""
        rows, indices, drafting = [], [], []
        for seq, packed, start in zip(batch, packed_starts, positions, strict=True):
            if seq.status is not Status.RUNNING or seq.pool is not None:
                continue
            tokens = [seq.token_at(position + 1) for position in range(start, seq.num_computed)]
            rows.append(DraftRows(start, seq.num_computed, tokens, seq.block_table, seq.ntk_alpha))
            indices += range(packed, packed + len(tokens))
            if not seq.prefilling and seq.num_computed == len(seq) - 1:
                room = min(self.drafted, seq.max_tokens - len(seq.output_ids) - 1, self.max_model_len - len(seq) - 1)
                drafting.append((seq, len(rows) - 1, self.blocks.reserve(seq, len(seq) + max(room, 0)) - len(seq)))
        if not rows:
            return
        normed, logits = self.runner.draft(rows, hidden[to_device(indices, torch.long, hidden.device)], True)
        drafting = [(seq, row, room) for seq, row, room in drafting if room > 0]
        for round_ in range(self.drafted):
            picked = self.sampler.read_back(logits[:, : self.vocab_size].argmax(-1))[0].tolist()
            for seq, row, _ in drafting:
                seq.draft_ids.append(picked[row])
            drafting = [(seq, row, room) for seq, row, room in drafting if room > round_ + 1]
            if not drafting:
                return
            chain = [DraftRows(seq.num_computed + round_, seq.num_computed + round_ + 1, [seq.draft_ids[-1]],
                               seq.block_table, seq.ntk_alpha) for seq, _, _ in drafting]
            selected = to_device([row for _, row, _ in drafting], torch.long, normed.device)
            normed, logits = self.runner.draft(chain, normed[selected], False)
            drafting = [(seq, index, room) for index, (seq, _, room) in enumerate(drafting)]

    @staticmethod
    def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``logits``' ``rows`` (the tensor itself when they are all of it)."""
        return logits if len(rows) == logits.shape[0] else logits[to_device(rows, torch.long, logits.device)]

    @staticmethod
    def _picks(result: SampleResult) -> zip:
        return zip(result.token_ids, result.logprobs, strict=True)

    def _sample_rows_alone(self, batch: list[Sequence], rows: list[int], requests: list[SampleRequest],
                           kept: torch.Tensor | None = None) -> list[Pick]:
        """The failure path: the forward pass again (it rewrites the same cache slots with the same values), or
        the ``kept`` logits of the sampled rows, then each row sampled on its own, so the rows that fail are
        known."""
        logits = self._rows_of(self.runner.run(batch), rows) if kept is None else kept
        picks: list[Pick] = []
        for row, request in enumerate(requests):
            try:
                picks.extend(self._picks(self.sampler(logits[row : row + 1].clone(), [request])))
            except Exception as exc:
                picks.append(f"sampling failed for this request: {exc!r}")
        return picks

    def _advance(self, seq: Sequence, pick: Pick) -> StepOutput:
        """Append the sampled token to ``seq`` (or end it with the error in ``pick``) and say what changed."""
        error = pick if isinstance(pick, str) else None
        token, logprobs = (-1, None) if error is not None else pick
        reason = "error" if error is not None else None
        if error is None:
            seq.num_computed = len(seq)
            seq.output_ids.append(token)
            seq.penalties.record(token)
            try:
                # A token its grammar refuses can only come from a row with nothing allowed left: that ends it too.
                refused = seq.matcher is not None and not seq.matcher.accept_token(token)
            except Exception as exc:
                refused, reason, error = False, "error", f"the grammar failed for this request: {exc!r}"
            if reason is None and (token in seq.stop_ids or refused):
                reason = "stop"
            elif reason is None and (len(seq.output_ids) >= seq.max_tokens or len(seq) >= self.max_model_len):
                reason = "length"
        visible = [token] if reason in (None, "length") else []
        if logprobs is not None and visible:
            seq.logprobs.append(logprobs)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._sequences[seq.request_id]
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=visible,
            new_logprobs=[logprobs] if logprobs is not None and visible else [],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            num_cached_tokens=seq.num_cached_prompt_tokens,
            error=error,
        )


@dataclass
class SpeculationCounts:
    """Speculative decoding so far: rows that verified drafted tokens, the tokens drafted, those accepted (in all,
    and by their position among a row's drafts)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    per_position: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.drafts += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self.per_position += [0] * (drafted - len(self.per_position))
        for position in range(accepted):
            self.per_position[position] += 1


def merged(first: StepOutput, then: StepOutput) -> StepOutput:
    """One request's output of a step that sampled it twice or more (verifying drafted tokens): ``then`` after
    ``first``."""
    return dataclasses.replace(then, new_token_ids=first.new_token_ids + then.new_token_ids,
                               new_logprobs=first.new_logprobs + then.new_logprobs)


class LLM:
    """Offline batch generation: ``LLM(model).generate(prompts, params)``, shaped like vLLM's."""

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, config: EngineConfig | None = None,
                 cpu_isa: str = "auto", cuda_int4_kernel: str = "auto", tensor_parallel_size: int = 1,
                 quantization: str | None = None) -> None:
        self.engine = LLMEngine.from_model(model, dtype=dtype, device=device, config=config, cpu_isa=cpu_isa,
                                           cuda_int4_kernel=cuda_int4_kernel, quantization=quantization,
                                           tensor_parallel_size=tensor_parallel_size)
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

    def embed(self, prompts: Seq[str | Seq[int]], pooling: str = "last") -> torch.Tensor:
        """Each prompt's final hidden states pooled by ``pooling`` ("last", "mean", "cls") and L2-normalised, fp32
        [prompts, hidden]."""
        return self._pooled(PoolingTask.embed(pooling), prompts)

    def last_token_logits(self, prompts: Seq[str | Seq[int]], token_ids: Seq[int]) -> torch.Tensor:
        """fp32 logits of ``token_ids`` at each prompt's last position [prompts, len(token_ids)] (a reranker's
        yes/no judgement)."""
        return self._pooled(PoolingTask.logits(tuple(token_ids)), prompts)

    def _pooled(self, task: PoolingTask, prompts: Seq[str | Seq[int]]) -> torch.Tensor:
        request_id = f"offline-{next(self._ids)}"
        self.engine.add_pooling(request_id, [self._encode(prompt) for prompt in prompts], task)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id == request_id:
                    if out.error is not None:
                        raise RuntimeError(out.error)
                    assert out.pooled is not None
                    return out.pooled
        raise RuntimeError("the engine ran out of work before the pooling request finished")

    def _encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, allow_special=True)
        return list(prompt)


__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "ModelInfo", "RequestOutput", "SamplingParams",
           "StepOutput"]
