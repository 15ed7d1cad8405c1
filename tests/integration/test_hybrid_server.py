"""A hybrid Qwen3.5 checkpoint behind the HTTP API: the built-in Qwen3.5 chat format (the checkpoint brings no
template) opens the reply inside a thought, so the reply is reasoning; a second request that extends the first
conversation resumes from the state snapshot and reports its prefix as cached; served with speculative decoding
by its multi-token-prediction block, a streamed completion is the model's own and the drafts are counted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import torch

from engine import LLM, SamplingParams
from engine.weights.loader import load_model
from server.app import build_engine
from server.settings import Settings
from tests.integration.conftest import RunningServer, engine_for, serve
from tests.unit.engine.test_hybrid_models import add_mtp_weights, build_config, write_checkpoint
from tests.unit.engine.test_speculative import oracle
from tokenizer.chat import builtin_template

SYSTEM = " ".join(f"Rule {i}: answer in plain words, no lists." for i in range(120))  # about 1,300 tokens


@pytest.fixture(scope="module")
def hybrid_server(tmp_path_factory, smollm2_tokenizer_files) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("qwen3.5")
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        if file.name != "chat_template.jinja":  # no template of its own: the built-in Qwen3.5 format applies
            (folder / file.name).write_bytes(file.read_bytes())
    loaded = load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    assert loaded.tokenizer.chat_template == builtin_template("qwen3_5")
    engine = engine_for(loaded)
    yield from serve(Settings(served_model_name="tiny-qwen3.5"), engine)
    engine.shutdown()


def chat(server: RunningServer, messages: list[dict]) -> dict:
    reply = httpx.post(f"{server.base}/chat/completions", timeout=120, json={
        "model": "tiny-qwen3.5", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_follow_up_resumes_the_conversation_from_its_state_snapshot(hybrid_server):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    reply = chat(hybrid_server, first)
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] and not message["content"]  # the reply opened inside a thought
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert prompt_tokens > 1024 and reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    follow_up = chat(hybrid_server, [*first, {"role": "assistant", "content": "Hi."},
                                     {"role": "user", "content": "And again?"}])
    cached = follow_up["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == prompt_tokens // 16 * 16 >= 1024  # the first prompt's last full block


@pytest.fixture(scope="module")
def drafting_server(tmp_path_factory, smollm2_tokenizer_files) -> Iterator[tuple[RunningServer, LLM]]:
    """The checkpoint with its multi-token-prediction block, served with ``--speculative mtp`` (settings as the
    command line gives them), beside the same model without drafts, offline."""
    folder = tmp_path_factory.mktemp("qwen3.5-mtp")
    write_checkpoint(folder, build_config("qwen3_5_text", vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    add_mtp_weights(folder)
    settings = Settings(model=str(folder), served_model_name="tiny-mtp", dtype="float32", device="cpu",
                        speculative="mtp", num_speculative_tokens=3, max_model_len=2048, kv_cache_memory=64 << 20)
    engine = build_engine(settings)
    yield from ((server, LLM(str(folder), dtype="float32", device="cpu")) for server in serve(settings, engine))
    engine.shutdown()


def stream_completion(server: RunningServer, prompt: list[int], ban: dict[int, float]) -> tuple[str, list, int]:
    """A streamed completion of 24 tokens: its text, its tokens' logprobs and how many chunks carried text."""
    text, logprobs, chunks = "", [], 0
    with httpx.stream("POST", f"{server.base}/completions", timeout=120, json={
            "model": "tiny-mtp", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True,
            "logprobs": 1, "logit_bias": {str(token): bias for token, bias in ban.items()}}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line.removeprefix("data: "))["choices"][0]
                text += choice["text"]
                logprobs += (choice.get("logprobs") or {}).get("token_logprobs") or []
                chunks += bool(choice["text"])
    return text, logprobs, chunks


def test_a_drafting_server_streams_the_model_s_own_tokens_and_counts_its_drafts(drafting_server):
    """Streamed completions of token ids with logprobs, served with drafts (the block's own, nearly all refused;
    then a drafter that knows the answer, right two times in three): the text of the model without them, every
    token's logprob, steps that accept drafts streaming several tokens in one chunk, and the drafts counted in
    /metrics."""
    server, plain = drafting_server
    prompt = [token * 151 % 49152 for token in range(3, 60)]
    ban = {plain.tokenizer.eos_token_id: -100.0}  # 24 tokens, whatever the random model would end with
    expected = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=24, logit_bias=ban))[0]
    want = plain.tokenizer.decode(expected.token_ids)
    text, logprobs, _ = stream_completion(server, prompt, ban)
    assert text == want and len(logprobs) == 24
    drafts = server.metric("vllm:spec_decode_num_drafts_total")
    assert drafts > 0 and server.metric("vllm:spec_decode_num_draft_tokens_total") >= drafts
    oracle(SimpleNamespace(engine=server.engine._engine), [prompt + expected.token_ids], vocab=49152)
    text, logprobs, chunks = stream_completion(server, prompt, ban)
    assert text == want and len(logprobs) == 24 and chunks < 20
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= server.metric("vllm:spec_decode_num_draft_tokens_total")
    lines = httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
    by_position = [float(line.rsplit(" ", 1)[1]) for position in range(3) for line in lines
                   if line.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total{")
                   and f'position="{position}"' in line]
    assert len(by_position) == 3 and sum(by_position) == accepted
    assert by_position[0] >= by_position[1] >= by_position[2]  # a later draft stands only after the ones before
