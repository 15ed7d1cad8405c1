"""Routed experts: the grouped computation against a per-token fp64 reference, and each chosen expert run once
per step over all of its tokens."""

from __future__ import annotations

import pytest
import torch

from engine.layers import DenseLinear
from engine.model import MLP, SparseMoE


def make_moe(experts: int, top_k: int, renormalize: bool, hidden: int = 16, inner: int = 8) -> SparseMoE:
    generator = torch.Generator().manual_seed(experts * 10 + top_k)

    def linear(rows: int, columns: int) -> DenseLinear:
        return DenseLinear(torch.randn(rows, columns, generator=generator, dtype=torch.float64) / columns**0.5, None)

    return SparseMoE(linear(experts, hidden), [MLP(linear(2 * inner, hidden), linear(hidden, inner))
                                               for _ in range(experts)], top_k, renormalize)


def per_token(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time."""
    rows = []
    for token in x:
        probabilities = moe.router(token[None]).softmax(-1)[0]
        weights, chosen = probabilities.topk(moe.top_k)
        if moe.renormalize:
            weights = weights / weights.sum()
        rows.append(sum(w * moe.experts[int(e)](token[None])[0] for w, e in zip(weights, chosen, strict=True)))
    return torch.stack(rows)


@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(8, 2, True), (6, 3, False), (4, 1, True)])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_grouped_experts_equal_the_per_token_definition(experts, top_k, renormalize, tokens):
    moe = make_moe(experts, top_k, renormalize)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens), dtype=torch.float64)
    torch.testing.assert_close(moe(x), per_token(moe, x), rtol=0, atol=1e-12)  # fp64: only summation order differs


def test_each_chosen_expert_runs_once_over_all_its_tokens():
    moe = make_moe(8, 2, True)
    calls: list[int] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moe(x)
    chosen = moe.router(x).softmax(-1).topk(2).indices
    assert len(calls) == chosen.unique().numel()  # one call per expert hit, not one per token
    assert sorted(calls) == sorted(torch.bincount(chosen.flatten()).tolist()[i] for i in chosen.unique().tolist())
