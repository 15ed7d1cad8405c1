"""What a real step asks of the device, counted op by op (a ``TorchDispatchMode`` over the CPU engine on the Qwen-1
reference model): the step's integers reach the device in one copy, the sampler's row parameters in one more, no
op waits on a value computed on the device (``.item()``, data-dependent shapes), and a decode step stays within a
budget of ops per layer (each a kernel launch on CUDA, where the eager step is launch-bound)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import LLM, SamplingParams
from engine.sampling import SampleRequest
from tests.unit.engine.conftest import QWEN1_MODEL

HOST_COPIES = {"aten.lift_fresh.default"}  # a host list becoming a tensor (on CUDA: a host-to-device copy)
SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default"}
VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int",
         "aten.unsqueeze.default", "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int", "aten.split.Tensor",
         "aten.split_with_sizes.default", "aten.expand.default", "aten.as_strided.default", "aten.alias.default",
         "aten.detach.default", "aten.permute.default", "aten.scalar_tensor.default"}
DECODE_OPS_PER_LAYER = 40  # measured 33 (fp32 RMSNorm is 5 ops on CPU, 1 fused kernel on CUDA)
DECODE_OPS_OUTSIDE_LAYERS = 12  # embedding, final norm, head


class OpCounter(TorchDispatchMode):
    """Counts every aten op; remembers whether each repeat_interleave was told its output size."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.unsized_repeats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.unsized_repeats += 1
        return func(*args, **kwargs)

    def count(self, names: set[str]) -> int:
        return sum(self.ops[name] for name in names)

    def computing(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEWS | HOST_COPIES)


@pytest.fixture
def engine():
    llm = LLM(str(QWEN1_MODEL), dtype="float32", device="cpu")
    for index, prompt in enumerate([list(range(1, 40)), list(range(5, 20)), list(range(60, 61))]):
        llm.engine.add_request(str(index), prompt, SamplingParams(max_tokens=8, temperature=0))
    return llm.engine


def advance(batch) -> None:
    for seq in batch:
        seq.num_computed = len(seq)
        seq.output_ids.append(3)


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_a_step_copies_its_integers_once_and_never_waits_on_the_device(engine, step):
    batch = engine.scheduler.schedule()
    if step == "decode":
        engine.runner.run(batch)
        advance(batch)
        batch = engine.scheduler.schedule()
    with OpCounter() as prepare:
        token_ids, inputs = engine.runner.prepare(batch)
    with OpCounter() as forward:
        engine.runner.model(token_ids, inputs, engine.runner.caches)
    assert prepare.count(HOST_COPIES) == 1 and forward.count(HOST_COPIES) == 0
    assert prepare.count(SYNCS) == forward.count(SYNCS) == 0
    assert prepare.unsized_repeats == forward.unsized_repeats == 0
    if step == "decode":
        layers = engine.model_config.num_layers
        assert forward.computing() <= DECODE_OPS_PER_LAYER * layers + DECODE_OPS_OUTSIDE_LAYERS


def test_the_sampler_copies_row_parameters_once_and_reads_back_only_the_tokens(engine):
    """Greedy rows: no host copy at all; sampled rows with top-p/top-k/min-p: one copy of all their parameters."""
    logits = torch.randn(3, engine.model_config.vocab_size)
    greedy = [SampleRequest(SamplingParams(temperature=0), [1], [], frozenset(), None) for _ in range(3)]
    sampled = [SampleRequest(SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05), [1], [], frozenset(),
                             None) for _ in range(3)]
    for rows, copies in ((greedy, 0), (sampled, 1)):
        with OpCounter() as sampler:
            engine.sampler(logits.clone(), rows)
        assert sampler.count(HOST_COPIES) == copies and sampler.count(SYNCS) == 0
