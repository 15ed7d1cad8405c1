"""The server through the clients people use: openai (sync, async, streaming), raw httpx SSE, LangChain."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import QWEN_NAME, SMOL_NAME

QUESTION = [{"role": "user", "content": "Write two sentences about the ocean."}]


@pytest.fixture(params=["smol", "qwen1"])
def server_and_model(request, smol_server, qwen1_server):
    return (smol_server, SMOL_NAME) if request.param == "smol" else (qwen1_server, QWEN_NAME)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_streaming_text_equals_non_streaming_greedy_text(server_and_model):
    server, model = server_and_model
    api = client(server)
    kwargs = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    whole = api.chat.completions.create(**kwargs)
    chunks = list(api.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"})
    # the same prompt again: its full blocks come from the prefix cache, and usage says so
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_stop_strings_never_appear(server_and_model):
    server, model = server_and_model
    api = client(server)
    kwargs = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 40}
    free = api.chat.completions.create(**kwargs).choices[0].message.content
    assert len(free) > 12
    stop = free[8:11]  # a string the greedy answer is known to contain
    cut = api.chat.completions.create(**kwargs, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       api.chat.completions.create(**kwargs, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content and stop not in streamed


def test_n_choices_in_both_modes(smol_server):
    api = client(smol_server)
    kwargs = {"model": SMOL_NAME, "messages": QUESTION, "max_tokens": 12, "n": 2, "seed": 11, "temperature": 1.0}
    whole = api.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in api.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_async_client_sixteen_concurrent_streams_are_batched(smol_server):
    api = openai.AsyncOpenAI(base_url=smol_server.base, api_key="unused", max_retries=0, timeout=120)
    peak = 0
    done = threading.Event()

    def watch_gauge() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, smol_server.metric("vllm:num_requests_running"))

    async def one(i: int) -> str:
        stream = await api.chat.completions.create(
            model=SMOL_NAME, messages=[{"role": "user", "content": f"Tell me fact number {i} about cats."}],
            max_tokens=24, stream=True, temperature=0.7, seed=i)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(16)))

    watcher = threading.Thread(target=watch_gauge)
    watcher.start()
    try:
        texts = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    assert len(texts) == 16 and all(texts)
    assert peak > 1


def test_raw_sse_over_httpx(smol_server):
    body = {"model": SMOL_NAME, "messages": QUESTION, "max_tokens": 8, "stream": True, "temperature": 0}
    events = []
    with httpx.stream("POST", f"{smol_server.base}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the greedy answer is longer than 8 tokens
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_text_completions_with_token_prompts_echo_and_logprobs(smol_server):
    api = client(smol_server)
    ids = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    result = api.completions.create(model=SMOL_NAME, prompt=ids, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = result.choices[0]
    assert choice.text.startswith("The capital of France is")
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(ids) + result.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    text = api.completions.create(model=SMOL_NAME, prompt="The capital of France is", max_tokens=4,
                                  temperature=0).choices[0].text
    assert choice.text == "The capital of France is" + text


def test_chat_logprobs(smol_server):
    result = client(smol_server).chat.completions.create(model=SMOL_NAME, messages=QUESTION, max_tokens=5,
                                                         temperature=0, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens - (result.choices[0].finish_reason == "stop")
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy picks the most likely


def test_logit_bias_bans_and_forces_tokens(smol_server):
    api = client(smol_server)
    kwargs = {"model": SMOL_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 6}
    first = api.chat.completions.create(**kwargs, logprobs=True).choices[0].logprobs.content[0].bytes
    first_id = httpx.post(f"{smol_server.url}/tokenize", json={"prompt": bytes(first).decode()}).json()["tokens"][0]
    banned = api.chat.completions.create(**kwargs, logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].bytes != first


def test_langchain_invoke_and_stream(smol_server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=smol_server.base, api_key="unused", model=SMOL_NAME, temperature=0, max_tokens=24)
    answer = chat.invoke("What is the capital of Germany?")
    assert "Berlin" in answer.content
    streamed = "".join(part.content for part in chat.stream("What is the capital of Germany?"))
    assert streamed == answer.content


def test_qwen1_prompt_follows_make_context(qwen1_server, qwen_tokenizer):
    from tokenizer import ChatMessage
    from tokenizer.chat import build_chatml_prompt

    messages = [{"role": "user", "content": "Hi<|im_end|>"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "你好"}]
    served = httpx.post(f"{qwen1_server.url}/tokenize", json={"messages": messages}).json()
    expected = build_chatml_prompt(qwen_tokenizer, [ChatMessage("system", "You are a helpful assistant."),
                                                    *(ChatMessage(m["role"], m["content"]) for m in messages)])
    assert served["tokens"] == expected.token_ids
    assert served["max_model_len"] == 1024


def test_the_prompts_of_one_completions_request_run_together(smol_server):
    """Several prompts are batched: all three run at once (the running gauge shows them), each to its length."""
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    body = {"model": SMOL_NAME, "prompt": prompts, "max_tokens": 160, "temperature": 0,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}  # no end of text: every prompt runs its full length
    seen = []
    reply: list[dict] = []
    worker = threading.Thread(target=lambda: reply.append(
        httpx.post(f"{smol_server.base}/completions", json=body, timeout=120).json()))
    worker.start()
    while worker.is_alive():
        seen.append(smol_server.metric("vllm:num_requests_running"))
        time.sleep(0.05)
    worker.join()
    assert max(seen) == 3
    choices = sorted(reply[0]["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2] and all(c["finish_reason"] == "length" for c in choices)
    assert reply[0]["usage"]["completion_tokens"] == 3 * 160
