"""Hostile embedding and rerank requests against server processes serving ``--task embed`` and ``--task rerank``,
/health probed from another process: bodies sized by their inputs or documents, texts past the character bound,
token ids past the vocabulary; each refused by its rule, then an ordinary request succeeds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.hostile.conftest import refused
from tests.hostile.processes import ServerProcess, send_while_probing, server_process
from tests.integration.conftest import SMOL_NAME

EMBEDDINGS = "/v1/embeddings"


@pytest.fixture(scope="module")
def embedder() -> Iterator[ServerProcess]:
    with server_process("--served-model-name", SMOL_NAME, "--task", "embed") as server:
        yield server


def raw_body(fields: str, key: str, item: bytes, count: int) -> bytes:
    """A body whose ``key`` lists ``item`` ``count`` times after the JSON ``fields``, written as bytes (too big to
    build as objects)."""
    return f'{{"model": "{SMOL_NAME}", {fields}"{key}": ['.encode() + b",".join([item] * count) + b"]}"


def raw_inputs(item: bytes, count: int) -> bytes:
    return raw_body("", "input", item, count)


def refused_then_served(server: ServerProcess, path: str, payload: Any, param: str, code: str | None,
                        says: str | None, ordinary: dict) -> dict:
    """``payload`` refused by its rule while /health is probed, then the ``ordinary`` request served; its reply."""
    raw = payload if isinstance(payload, bytes) else None
    refused(send_while_probing(server, "POST", path, body=None if raw is not None else payload, raw=raw), 400,
            param=param, code=code, says=says)
    reply = httpx.post(server.url + path, json=ordinary, timeout=60)
    assert reply.status_code == 200
    return reply.json()


CASES: list[tuple[str, Any, str, str | None, str]] = [
    ("inputs-60000", raw_inputs(b'"a"', 60_000), "input", "too_long", "16384"),
    ("inputs-5000", raw_inputs(b'"a"', 5000), "input", None, "at most 2048 inputs"),
    ("ids-1.5M", raw_inputs(b"1", 1_500_000), "input", "too_long", "1048576"),
    ("ids-negative-million", raw_inputs(b"-1", 1_000_000), "input", "greater_than_equal", "greater than"),
    ("text-7MB", {"model": SMOL_NAME, "input": "hello world " * 600_000}, "input", "context_length_exceeded",
     "max_prompt_chars"),
    ("ids-outside-vocabulary", {"model": SMOL_NAME, "input": [[5, 49152]]}, "input.0", None, "token ids must be in"),
    ("dimensions-huge", {"model": SMOL_NAME, "input": "hi", "dimensions": 2**40}, "dimensions", None, None),
]


@pytest.mark.parametrize(("payload", "param", "code", "says"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_embedding_requests_are_refused_by_their_rule(embedder, payload, param, code, says):
    ordinary = {"model": SMOL_NAME, "input": ["hi", "there"]}
    assert len(refused_then_served(embedder, EMBEDDINGS, payload, param, code, says, ordinary)["data"]) == 2


@pytest.fixture(scope="module")
def reranker() -> Iterator[ServerProcess]:
    with server_process("--served-model-name", SMOL_NAME, "--task", "rerank") as server:
        yield server


def raw_documents(item: bytes, count: int) -> bytes:
    return raw_body('"query": "q", ', "documents", item, count)


RERANK_CASES: list[tuple[str, Any, str, str | None, str]] = [
    ("documents-60000", raw_documents(b'"a"', 60_000), "documents", "too_long", "16384"),
    ("documents-5000", raw_documents(b'"a"', 5000), "documents", None, "at most 1024 documents"),
    ("document-7MB", {"model": SMOL_NAME, "query": "q", "documents": ["hello world " * 600_000]}, "documents",
     "context_length_exceeded", "max_prompt_chars"),
    ("query-100KB-times-200", {"model": SMOL_NAME, "query": "q" * 100_000, "documents": ["d"] * 200}, "documents",
     "context_length_exceeded", "max_prompt_chars"),
    ("document-object-text", {"model": SMOL_NAME, "query": "q", "documents": [{"text": {"a": 1}}]}, "documents.0",
     None, None),
]


@pytest.mark.parametrize(("payload", "param", "code", "says"), [case[1:] for case in RERANK_CASES],
                         ids=[case[0] for case in RERANK_CASES])
def test_rerank_requests_are_refused_by_their_rule(reranker, payload, param, code, says):
    ordinary = {"model": SMOL_NAME, "query": "capital of France?", "documents": ["Paris.", "Bananas."]}
    assert len(refused_then_served(reranker, "/v1/rerank", payload, param, code, says, ordinary)["results"]) == 2
