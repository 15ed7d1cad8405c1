"""The vectorised sampler against straightforward one-row references on fixed logits (on CPU, and on CUDA where
present: every tensor the sampler makes must follow the logits' device)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from engine.sampling import Sampler, SampleRequest, SamplingParams, apply_penalties_and_bias, truncate

V = 50
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def logits_rows(n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return (torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3).to(device)


def request(params: SamplingParams, prompt=(), output=(), stops=frozenset(), generator=None) -> SampleRequest:
    return SampleRequest(params, list(prompt), list(output), frozenset(stops), generator)


def reference_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens that survive top-k, then top-p, then min-p, computed the obvious way."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept = order[:top_k] if top_k > 0 else order
    weights = [math.exp(row[i] - row[kept[0]]) for i in kept]
    total = sum(weights)
    nucleus, mass = [], 0.0
    for token, weight in zip(kept, weights, strict=True):
        if mass >= top_p:
            break
        nucleus.append(token)
        mass += weight / total
    probs = {t: w / total for t, w in zip(kept, weights, strict=True) if t in nucleus}
    renorm = sum(probs.values())
    top = max(probs.values()) / renorm
    return {t for t, p in probs.items() if p / renorm >= min_p * top}


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2),
                                               (10, 0.9, 0.05), (1, 0.5, 0.5), (0, 0.01, 0.0), (3, 1.0, 0.9)])
def test_truncation_matches_reference(top_k, top_p, min_p):
    logits = logits_rows(6, seed=top_k + int(top_p * 100))
    n = logits.shape[0]
    out = truncate(logits, torch.full((n,), top_k), torch.full((n,), top_p), torch.full((n,), min_p))
    for row in range(n):
        kept = {i for i in range(V) if out[row, i] > float("-inf")}
        assert kept == reference_keep(logits[row].tolist(), top_k, top_p, min_p)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_rows_truncate_independently(device):
    logits = logits_rows(3, device=device)
    per_row = partial(torch.tensor, device=device)
    out = truncate(logits, per_row([0, 4, 0]), per_row([1.0, 1.0, 0.6]), per_row([0.0, 0.0, 0.0])).cpu()
    assert (out[0] > float("-inf")).sum() == V
    assert (out[1] > float("-inf")).sum() == 4
    assert {i for i in range(V) if out[2, i] > float("-inf")} == reference_keep(logits[2].tolist(), 0, 0.6, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_and_bias_match_reference(device):
    logits = logits_rows(1, device=device)
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 4, 7]
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={9: 5.0, 10: -100.0})
    actual = apply_penalties_and_bias(logits.clone(), [request(params, prompt, output)])[0].cpu()
    expected = logits[0].tolist()
    for token in (9, 10):
        expected[token] += params.logit_bias[token]
    for token in set(prompt) | set(output):  # HF: divide positive, multiply negative logits
        value = expected[token]
        expected[token] = value * 1.3 if value < 0 else value / 1.3
    for token in set(output):  # OpenAI: presence once, frequency per occurrence (output tokens only)
        expected[token] -= 0.5 + 0.25 * output.count(token)
    torch.testing.assert_close(actual, torch.tensor(expected))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_different_penalties_get_what_each_gets_alone(device):
    """The penalties run once over the rows that use them: each row equals its own single-row result, bit for bit,
    whatever its neighbours use."""
    logits = logits_rows(5, device=device)
    prompt, output = [1, 2, 3, 3], [3, 4, 4, 4, 7]
    rows = [request(SamplingParams(), prompt, output),
            request(SamplingParams(repetition_penalty=1.3), prompt, output),
            request(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, output),
            request(SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias={9: 2.0}), [5], [5, 6]),
            request(SamplingParams(repetition_penalty=1.1), [8, 9], [])]
    together = apply_penalties_and_bias(logits.clone(), rows)
    for index, row in enumerate(rows):
        alone = apply_penalties_and_bias(logits[index : index + 1].clone(), [row])
        assert torch.equal(together[index], alone[0])
    assert torch.equal(together[0], logits[0])


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_bans_stop_ids_until_reached(device):
    logits = torch.zeros(1, V, device=device)
    logits[0, 7] = 10.0
    params = SamplingParams(temperature=0, min_tokens=3)
    sampler = Sampler()
    assert sampler(logits.clone(), [request(params, output=[1], stops={7})]).token_ids != [7]
    assert sampler(logits.clone(), [request(params, output=[1, 2, 3], stops={7})]).token_ids == [7]


def test_vocab_limit_hides_padding_rows_and_greedy_is_argmax():
    logits = logits_rows(2)
    logits[:, 45:] = 100.0
    result = Sampler(vocab_limit=45)(logits.clone(), [request(SamplingParams(temperature=0))] * 2)
    assert result.token_ids == logits[:, :45].argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_distribution_with_top_alternatives(device):
    logits = logits_rows(1, device=device)
    params = SamplingParams(temperature=0, logprobs=3, logit_bias={0: 50.0})
    result = Sampler()(logits.clone(), [request(params)])
    raw = logits[0].log_softmax(-1)
    entry = result.logprobs[0]
    assert result.token_ids == [0]
    assert entry[0] == pytest.approx(raw[0].item())
    for token in raw.topk(3).indices.tolist():
        assert entry[token] == pytest.approx(raw[token].item())


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproduce_whatever_else_is_in_the_batch(device):
    logits = logits_rows(4, device=device)
    params = SamplingParams(temperature=1.0, seed=1234)

    def seeded() -> SampleRequest:
        return request(params, generator=torch.Generator(device).manual_seed(1234))

    alone = [Sampler()(logits[1:2].clone(), [seeded()]).token_ids[0] for _ in range(3)]
    crowd = Sampler()(logits.clone(), [request(SamplingParams()), seeded(), request(SamplingParams(top_k=3)),
                                       request(SamplingParams(temperature=0))]).token_ids[1]
    assert alone == [crowd] * 3


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (V - 3)]))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(3000):
        token = Sampler()(logits.clone(), [request(SamplingParams(), generator=generator)]).token_ids[0]
        counts[token] += 1
    torch.testing.assert_close(counts[:3] / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2},
                                 {"repetition_penalty": 0}, {"max_tokens": 0}, {"logprobs": -1}])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
