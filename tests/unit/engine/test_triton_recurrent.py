"""The gated delta rule on its Triton kernel (under ``TRITON_INTERPRET=1`` where there is no GPU) against the
recurrent form in fp64: decode rows on scattered slots, prompts from a carried state with a prefix snapshot kept on
the way, the chunked form's scan over a prompt's chunks, and a hybrid model whose linear layers run on the kernels
giving transformers' greedy tokens, also when it verifies drafted tokens."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from engine import LLM, EngineConfig
from engine.kernels import triton_recurrent
from engine.linear_attention import (
    CHUNK,
    ChunkTerms,
    GatedDeltaNet,
    chunk_terms,
    l2norm,
    recurrent_update,
    scan_chunks,
)
from tests.unit.engine.test_hybrid_models import (
    GREEDY,
    add_mtp_weights,
    build_config,
    greedy_reference,
    random_prompt,
    write_checkpoint,
)
from tests.unit.engine.test_speculative import oracle

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 2e-5  # fp32 against fp64, absolute (rtol 0): outputs and states of order 1 over up to 70 tokens
SLOTS, HEADS = 6, 3


def inputs(tokens: int, key_dim: int, value_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Queries and keys L2-normalised as the layer makes them, values, log decays and betas; fp32."""
    generator = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(tokens, HEADS, key_dim, generator=generator)) * key_dim**-0.5
    k = l2norm(torch.randn(tokens, HEADS, key_dim, generator=generator))
    v = torch.randn(tokens, HEADS, value_dim, generator=generator)
    decay = -torch.rand(tokens, HEADS, generator=generator)
    beta = torch.rand(tokens, HEADS, generator=generator)
    return q, k, v, decay, beta


def random_states(key_dim: int, value_dim: int) -> torch.Tensor:
    return torch.randn(SLOTS, HEADS, key_dim, value_dim, generator=torch.Generator().manual_seed(99))


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def sequential(state: torch.Tensor, q, k, v, decay, beta) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp64 recurrent form over T tokens of one row: outputs [T, H, V] and the state after each token."""
    state = state.double().clone()[None]
    outs, states = [], []
    for t in range(q.shape[0]):
        outs.append(recurrent_update(state, *(x[t : t + 1].double() for x in (q, k, v, decay, beta)))[0])
        states.append(state[0].clone())
    return torch.stack(outs), states


@pytest.mark.parametrize("key_dim,value_dim", [(16, 16), (32, 64), (128, 96)])
def test_decode_rows_advance_their_slots_in_place(key_dim, value_dim):
    """Three rows on slots 4, 0 and 2 of six: each row's output and its slot's new state are one fp64 step; the
    other slots are untouched (bit for bit)."""
    slots = torch.tensor([4, 0, 2])
    states = random_states(key_dim, value_dim)
    q, k, v, decay, beta = inputs(3, key_dim, value_dim, seed=key_dim + value_dim)
    expected_states = states.double().clone()
    expected_rows = expected_states[slots]
    expected = recurrent_update(expected_rows, *(x.double() for x in (q, k, v, decay, beta)))
    expected_states[slots] = expected_rows
    on_card = states.to(DEVICE, copy=True)
    out = triton_recurrent.decode(on_card, *on_device(slots, q, k, v, decay, beta))
    assert out.shape == (3, HEADS, value_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(on_card.cpu().double(), expected_states, atol=ATOL, rtol=0)
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(on_card.cpu()[untouched], states[untouched])


@pytest.mark.parametrize("kept_after", [None, 0, 37, 70])
def test_a_prompt_runs_from_its_state_and_keeps_a_snapshot(kept_after):
    """70 tokens from slot 1's state: every output, the final state, and (where asked) the state after
    ``kept_after`` tokens left in slot 5; the other slots untouched."""
    key_dim, value_dim = 32, 64
    states = random_states(key_dim, value_dim)
    q, k, v, decay, beta = inputs(70, key_dim, value_dim, seed=kept_after or 7)
    expected, after = sequential(states[1], q, k, v, decay, beta)
    on_card = states.to(DEVICE, copy=True)
    kept = None if kept_after is None else (kept_after, 5)
    out = triton_recurrent.prompt(on_card, 1, kept, *on_device(q, k, v, decay, beta))
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(on_card[1].cpu().double(), after[-1], atol=ATOL, rtol=0)
    if kept_after is not None:
        snapshot = states[1].double() if kept_after == 0 else after[kept_after - 1]
        torch.testing.assert_close(on_card[5].cpu().double(), snapshot, atol=ATOL, rtol=0)
    untouched = [0, 2, 3, 4] + ([5] if kept_after is None else [])
    assert torch.equal(on_card.cpu()[untouched], states[untouched])


@pytest.mark.parametrize("key_dim,value_dim", [(32, 64), (128, 96)])
def test_the_chunk_scan_carries_the_state_through_the_chunks(key_dim, value_dim):
    """145 tokens (two chunks and a padded third) from slot 2's state, the chunked form's terms from torch and the
    scan on the kernel: every output and the state it leaves equal the recurrent form's in fp64 (fp32 rounding) and
    torch's scan of the same terms; the other slots untouched."""
    states = random_states(key_dim, value_dim)
    q, k, v, decay, beta = inputs(145, key_dim, value_dim, seed=key_dim)
    expected, after = sequential(states[2], q, k, v, decay, beta)
    terms = chunk_terms(q, k, v, decay, beta)
    on_card = states.to(DEVICE, copy=True)
    out = triton_recurrent.scan(on_card, 2, ChunkTerms(*on_device(*dataclasses.astuple(terms))))
    assert out.shape == (HEADS, 3 * CHUNK, value_dim)
    # measured under the interpreter: 1.4e-7 and 4.6e-7 from fp64, and torch's scan bit for bit
    torch.testing.assert_close(out[:, :145].transpose(0, 1).cpu().double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(on_card[2].cpu().double(), after[-1], atol=2e-6, rtol=0)
    in_torch = states[2].clone()
    torch.testing.assert_close(out.cpu(), scan_chunks(in_torch, terms), atol=1e-6, rtol=0)  # a card sums otherwise
    torch.testing.assert_close(on_card[2].cpu(), in_torch, atol=1e-6, rtol=0)
    untouched = [0, 1, 3, 4, 5]
    assert torch.equal(on_card.cpu()[untouched], states[untouched])


def test_a_hybrid_model_on_the_kernel_gives_the_reference_tokens(tmp_path):
    """fp32, every linear layer's delta rule on the kernels (decode rows and short prompts token by token, a
    150-token prompt's chunks on the scan), alone and batched."""
    reference = write_checkpoint(tmp_path, build_config("qwen3_5_text"))
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_isa="torch")
    llm.engine.runner.model.use_triton_recurrence(True)
    layers = [layer.attn for layer in llm.engine.runner.model.layers if isinstance(layer.attn, GatedDeltaNet)]
    assert layers and all(layer.triton and layer.decode_kernel is None for layer in layers)
    prompts = [random_prompt(150, seed=4), random_prompt(40), random_prompt(11, seed=2)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [greedy_reference(reference, p) for p in prompts]


def test_drafted_tokens_verified_on_the_kernel_give_the_reference_tokens(tmp_path):
    """Speculative decoding with every linear layer on the kernel: a row verifying drafted tokens advances its
    states round by round into the slots of its group (each round's state copied ahead of the kernel, which works
    in place), and drafts right two times in three give transformers' greedy tokens, alone and batched."""
    reference = write_checkpoint(tmp_path, build_config("qwen3_5_text"))
    add_mtp_weights(tmp_path)
    prompts = [random_prompt(40), random_prompt(11, seed=2)]
    expected = [greedy_reference(reference, p) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", cpu_isa="torch", config=EngineConfig(speculative_tokens=2))
    llm.engine.runner.model.use_triton_recurrence(True)
    oracle(llm, [p + e for p, e in zip(prompts, expected, strict=True)])
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
