"""A hybrid Qwen3.5 checkpoint behind the HTTP API: the built-in Qwen3.5 chat format (the checkpoint brings no
template) opens the reply inside a thought, so the reply is reasoning; a second request that extends the first
conversation resumes from the state snapshot and reports its prefix as cached."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from engine.weights.loader import load_model
from server.settings import Settings
from tests.integration.conftest import RunningServer, engine_for, serve
from tests.unit.engine.test_hybrid_models import build_config, write_checkpoint
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
