"""/v1/embeddings over a socket with the ``openai`` client and LangChain (with texts, and by default with
cl100k_base token ids): the embedded model served with ``--task embed``; texts and token ids give the same vectors,
base64 is the same floats, ``dimensions`` cuts and re-normalises, and a generative server or an input past the
context is a 400 that names why."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import torch

from engine.weights.loader import load_model
from server.settings import Settings
from tests.integration.cl100k import ensure_cl100k
from tests.integration.conftest import QWEN_NAME, SMOL_NAME, RunningServer, engine_for, serve

TEXTS = ["The capital of France is Paris.", "Bonjour", "a " * 300]


@pytest.fixture(scope="module")
def embedder(smol_loaded) -> Iterator[RunningServer]:
    engine = engine_for(smol_loaded, max_num_batched_tokens=256)  # several passes for TEXTS
    yield from serve(Settings(served_model_name=SMOL_NAME, task="embed"), engine)
    engine.shutdown()


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_texts_and_their_token_ids_embed_alike(embedder):
    reply = client(embedder).embeddings.create(model=SMOL_NAME, input=TEXTS)
    vectors = np.array([item.embedding for item in sorted(reply.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 576) and [d.index for d in reply.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5, rtol=0)
    ids = [httpx.post(f"{embedder.url}/tokenize", json={"prompt": text, "add_special_tokens": False},
                      timeout=30).json()["tokens"] for text in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(map(len, ids))
    by_ids = client(embedder).embeddings.create(model=SMOL_NAME, input=ids)
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), vectors, atol=1e-5, rtol=0)
    alone = client(embedder).embeddings.create(model=SMOL_NAME, input=TEXTS[1])
    np.testing.assert_allclose(alone.data[0].embedding, vectors[1], atol=1e-5, rtol=0)
    assert np.abs(vectors[0] - vectors[1]).max() > 0.01  # different texts, different vectors


def test_base64_and_dimensions(embedder):
    floats = client(embedder).embeddings.create(model=SMOL_NAME, input=TEXTS[:2]).data
    raw = httpx.post(f"{embedder.base}/embeddings", timeout=60, json={
        "model": SMOL_NAME, "input": TEXTS[:2], "encoding_format": "base64"}).json()["data"]
    decoded = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in raw]
    np.testing.assert_array_equal(np.array(decoded), np.array([d.embedding for d in floats], dtype=np.float32))
    cut = client(embedder).embeddings.create(model=SMOL_NAME, input=TEXTS[:2], dimensions=64).data
    full = np.array([d.embedding for d in floats])[:, :64]
    np.testing.assert_allclose(np.array([d.embedding for d in cut]),
                               full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_langchain_embeds_documents_and_queries(embedder):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model=SMOL_NAME, base_url=embedder.base, api_key="unused",
                                  check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS[:2])
    query = embeddings.embed_query(TEXTS[1])
    assert len(documents) == 2 and len(documents[0]) == 576
    np.testing.assert_allclose(query, documents[1], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def qwen_vocab_embedder(qwen1_folder) -> Iterator[RunningServer]:
    """The tiny Qwen-7B-Chat-shaped model (Qwen's 151,936-token vocabulary) served with ``--task embed``."""
    loaded = load_model(str(qwen1_folder), dtype=torch.float32, device=torch.device("cpu"))
    engine = engine_for(loaded)
    yield from serve(Settings(served_model_name=QWEN_NAME, task="embed"), engine)
    engine.shutdown()


def test_langchain_by_default_sends_openai_token_ids_and_gets_their_vectors(qwen_vocab_embedder, monkeypatch):
    """LangChain's default tokenizes with cl100k_base and sends the ids (every one inside Qwen's vocabulary): the
    vectors are the server's for those ids, in order, and usage counts them."""
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(ensure_cl100k()))
    sent, usage = [], []

    def record_request(request: httpx.Request) -> None:
        sent.append(json.loads(request.content)["input"])

    def record_response(response: httpx.Response) -> None:
        response.read()
        usage.append(response.json()["usage"])

    hooks = {"request": [record_request], "response": [record_response]}
    embeddings = OpenAIEmbeddings(model=QWEN_NAME, base_url=qwen_vocab_embedder.base, api_key="unused",
                                  http_client=httpx.Client(event_hooks=hooks, timeout=120))
    documents = embeddings.embed_documents(TEXTS)
    ids = [tiktoken.get_encoding("cl100k_base").encode_ordinary(text) for text in TEXTS]
    assert sent == [ids] and usage == [{"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}]
    direct = client(qwen_vocab_embedder).embeddings.create(model=QWEN_NAME, input=ids).data
    assert [len(vector) for vector in documents] == [64, 64, 64]
    np.testing.assert_allclose(np.array(documents), np.array([d.embedding for d in direct]), atol=1e-5, rtol=0)
    query = embeddings.embed_query(TEXTS[1])
    np.testing.assert_allclose(query, documents[1], atol=1e-5, rtol=0)
    assert np.abs(np.array(documents[0]) - np.array(documents[1])).max() > 0.01


@pytest.mark.parametrize(("body", "status", "param", "says"), [
    ({"input": ["ok", "word " * 9000]}, 400, "input", "characters"),
    ({"input": [[1, 2], list(range(3000))]}, 400, "input.1", "each must have 1 to 2048"),
    ({"input": [[1, 10**6]]}, 400, "input.0", "token ids must be in"),
    ({"input": []}, 400, "input", "must not be empty"),
    ({"input": "hi", "dimensions": 10_000}, 400, "dimensions", "at most the model's 576"),
    ({"input": ["x"] * 3000}, 400, "input", "at most 2048 inputs"),
])
def test_inputs_it_cannot_embed_are_a_400(embedder, body, status, param, says):
    reply = httpx.post(f"{embedder.base}/embeddings", json={"model": SMOL_NAME, **body}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith(param) and says in error["message"], error


def test_a_generative_server_names_the_task(smol_server):
    reply = httpx.post(f"{smol_server.base}/embeddings", json={"model": SMOL_NAME, "input": "hi"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "wrong_task"
    assert "--task embed" in reply.json()["error"]["message"]


def test_requests_beyond_what_the_queue_holds_get_429(embedder):
    """Embedding requests take the places chat requests take: with every seat and queue place held, a 429."""
    engine = embedder.app.state.qwen.service.engine
    held = engine.info.max_num_seqs + engine.info.max_waiting
    for _ in range(held):
        engine._admit()
    try:
        reply = httpx.post(f"{embedder.base}/embeddings", json={"model": SMOL_NAME, "input": "hi"}, timeout=30)
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "queue_full"
    finally:
        for _ in range(held):
            engine._release()
    assert httpx.post(f"{embedder.base}/embeddings", json={"model": SMOL_NAME, "input": "hi"}, timeout=30).is_success


def test_pooled_tokens_are_counted(embedder):
    before = embedder.metric("qwen_serve:pooled_tokens_total")
    reply = client(embedder).embeddings.create(model=SMOL_NAME, input=TEXTS[:2])
    assert embedder.metric("qwen_serve:pooled_tokens_total") - before == reply.usage.prompt_tokens
