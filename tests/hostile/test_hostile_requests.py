"""Hostile requests, one class of attack each: every one gets a 4xx in OpenAI's envelope (or a correct 200), /health
answers within a second while it is handled, and an ordinary request succeeds afterwards on the same process."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.hostile.conftest import ORDINARY, assert_envelope, assert_still_serving, send
from tests.integration.conftest import SMOL_NAME

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict:
    return {"model": SMOL_NAME, "messages": HI, "max_tokens": 2, **fields}


def tool(name: str = "get_weather", parameters: Any = None, description: str = "weather") -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def json_format(schema: Any) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}


def ref_chain(links: int) -> dict:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(links)}
    defs[f"d{links}"] = {"type": "string"}
    return {"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def nested(levels: int) -> dict:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def raw_chat(fragment: bytes) -> bytes:
    """A chat body with ``fragment`` spliced in as raw JSON text (for what json.dumps would not write)."""
    return b'{"model": "' + SMOL_NAME.encode() + b'", "max_tokens": 2, ' + fragment + b"}"


MANY_PROMPTS = {"model": SMOL_NAME, "prompt": ["a"] * 100_000, "n": 2, "max_tokens": 1}

# (id, method, path, json body or raw bytes, status, the refusing rule: a fragment of param|code|message)
CASES: list[tuple[str, str, str, Any, int, str]] = [
    # numbers outside what the engine can represent
    ("seed-2^64", "POST", CHAT, chat(seed=2**64), 400, "seed|less_than"),
    ("seed-negative", "POST", CHAT, chat(seed=-1), 400, "seed|greater_than_equal"),
    ("top_k-2^64", "POST", CHAT, chat(top_k=2**64, temperature=1), 400, "top_k|less_than_equal"),
    ("top_k-over-vocabulary", "POST", CHAT, chat(top_k=10**6, temperature=1), 400, "at most the vocabulary size"),
    ("top_k-minus-2", "POST", CHAT, chat(top_k=-2), 400, "top_k|greater_than_equal"),
    ("temperature-NaN", "POST", CHAT, raw_chat(b'"messages": [{"role": "user", "content": "hi"}], "temperature": NaN'),
     400, 'temperature|finite_number'),
    ("temperature-Infinity", "POST", CHAT,
     raw_chat(b'"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity'),
     400, "temperature|finite_number"),
    ("max_tokens-2^40", "POST", CHAT, chat(max_tokens=2**40), 400, "max_tokens|less_than_equal"),
    ("prompt-over-context", "POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 9000}]),
     400, "messages|context_length_exceeded"),
    ("n-huge", "POST", CHAT, chat(n=10**9), 400, "n|less_than_equal"),
    ("top_logprobs-huge", "POST", CHAT, chat(logprobs=True, top_logprobs=10**6), 400, "top_logprobs|less_than_equal"),
    ("presence_penalty-huge", "POST", CHAT, chat(presence_penalty=1e308), 400, "presence_penalty|less_than_equal"),
    ("repetition_penalty-zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty|greater_than"),
    ("min_p-two", "POST", CHAT, chat(min_p=2), 400, "min_p|less_than_equal"),
    ("logit_bias-value-huge", "POST", CHAT, chat(logit_bias={"5": 1e9}), 400, "logit_bias.5|less_than_equal"),
    ("logit_bias-key-double-minus", "POST", CHAT, chat(logit_bias={"--1": 1}), 400, "keys must be token ids"),
    ("logit_bias-key-superscript", "POST", CHAT, chat(logit_bias={"²": 1}), 400, "keys must be token ids"),
    ("logit_bias-key-huge", "POST", CHAT, chat(logit_bias={"99999999999": 1}), 400, "keys must be token ids"),
    ("logit_bias-key-outside-vocabulary", "POST", CHAT, chat(logit_bias={"49152": 1}),
     400, "token ids must be in [0, 49152)"),
    ("logit_bias-key-negative", "POST", CHAT, chat(logit_bias={"-3": 1}), 400, "token ids must be in [0, 49152)"),
    ("logit_bias-key-lone-surrogate", "POST", CHAT,
     raw_chat(b'"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"\\ud800": 1}'), 400, "hex escape"),
    ("logit_bias-too-many", "POST", CHAT, chat(logit_bias={str(i): 1 for i in range(5000)}),
     400, "at most 1024 entries"),
    # counts
    ("messages-too-many", "POST", CHAT, chat(messages=HI * 5000), 400, "at most 1024 messages"),
    ("stop-too-many", "POST", CHAT, chat(stop=[f"s{i}" for i in range(100)]), 400, "at most 16 stop strings"),
    ("stop-too-long", "POST", CHAT, chat(stop=["x" * 10_000]), 400, "at most 256 characters"),
    ("tools-too-many", "POST", CHAT, chat(tools=[tool(f"f{i}") for i in range(500)]), 400, "at most 128 tools"),
    ("tool-name-control-characters", "POST", CHAT, chat(tools=[tool("get\x00weather\n")]),
     400, "function names must match"),
    ("tool-name-spaces", "POST", CHAT, chat(tools=[tool("get weather")]), 400, "function names must match"),
    ("tool-name-too-long", "POST", CHAT, chat(tools=[tool("f" * 65)]), 400, "function names must match"),
    ("tool-choice-unknown-function", "POST", CHAT,
     chat(tools=[tool()], tool_choice={"type": "function", "function": {"name": "nope"}}),
     400, "is not among the given ones"),
    ("history-call-name-control-characters", "POST", CHAT, chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "a\u202eb", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]), 400, "function names must match"),
    ("completions-prompts-times-n", "POST", COMPLETIONS, MANY_PROMPTS, 400, "prompt|too_long"),
    ("completions-token-outside-vocabulary", "POST", COMPLETIONS,
     {"model": SMOL_NAME, "prompt": [1, 2, 10**9], "max_tokens": 1}, 400, "prompt token ids must be in"),
    ("completions-token-negative", "POST", COMPLETIONS, {"model": SMOL_NAME, "prompt": [1, -2], "max_tokens": 1},
     400, "prompt.1|greater_than_equal"),
    ("completions-empty-prompt-list", "POST", COMPLETIONS, {"model": SMOL_NAME, "prompt": [], "max_tokens": 1},
     400, "prompt: Value error, must not be empty"),
    ("detokenize-token-huge", "POST", "/detokenize", {"tokens": [10**12]}, 400, "tokens.0|less_than_equal"),
    ("detokenize-token-outside-vocabulary", "POST", "/detokenize", {"tokens": [10**6]}, 400, "token ids must be in"),
    ("tokenize-messages-too-many", "POST", "/tokenize", {"messages": HI * 5000}, 400, "at most 1024 messages"),
    # JSON schemas
    ("schema-ref-chain-response_format", "POST", CHAT, chat(response_format=json_format(ref_chain(20_000))),
     400, "larger than 32768 bytes"),
    ("schema-ref-chain-tool-parameters", "POST", CHAT,
     chat(tools=[tool(parameters=ref_chain(20_000))], tool_choice="required"), 400, "larger than 32768 bytes"),
    ("schema-ref-count", "POST", CHAT, chat(response_format=json_format(ref_chain(200))), 400, "more than 128 $ref"),
    ("schema-nested-40", "POST", CHAT, chat(response_format=json_format(nested(40))),
     400, "nested deeper than 32 levels"),
    ("schema-nested-5000", "POST", CHAT, raw_chat(
        b'"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": '
        b'{"name": "r", "schema": ' + b'{"type": "object", "properties": {"x": ' * 5000 + b'{"type": "string"}'
        + b"}}" * 5000 + b"}}"), 400, "recursion limit"),
    ("schema-maxLength-thousands", "POST", CHAT, chat(response_format=json_format(
        {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 5000} for i in range(3)}})),
     400, "maxLength may be at most 512"),
    ("schema-maxItems-huge", "POST", CHAT, chat(response_format=json_format(
        {"type": "array", "items": {"type": "integer"}, "minItems": 10**9})), 400, "minItems may be at most 512"),
    ("schema-dollar-schema-number", "POST", CHAT, chat(response_format=json_format({"$schema": 1})),
     400, "$schema must be a string"),
    ("schema-dollar-schema-list", "POST", CHAT, chat(response_format=json_format({"$schema": []})),
     400, "$schema must be a string"),
    ("schema-too-large", "POST", CHAT, chat(response_format=json_format(
        {"type": "object", "properties": {f"property_{i}": {"type": "string"} for i in range(3000)}})),
     400, "larger than 32768 bytes"),
    ("schema-unknown-type", "POST", CHAT, chat(response_format=json_format({"type": "foo"})),
     400, "invalid JSON schema"),
    ("schema-missing-ref", "POST", CHAT, chat(response_format=json_format({"$ref": "#/$defs/missing"})),
     400, "Cannot find field $defs"),
    ("schema-unsupported-keyword", "POST", CHAT, chat(response_format=json_format({"not": {"type": "string"}})),
     400, "unsupported JSON schema keywords: not"),
    ("schema-json_schema-missing", "POST", CHAT, chat(response_format={"type": "json_schema"}),
     400, "needs a json_schema"),
    ("tool-parameters-not-object", "POST", CHAT, chat(tools=[tool(parameters={"type": "string"})]),
     400, "must be a JSON schema of type object"),
    # text that UTF-8 cannot hold, and bodies that are not what they claim
    ("content-lone-surrogate", "POST", CHAT, raw_chat(b'"messages": [{"role": "user", "content": "\\ud800"}]'),
     400, "hex escape"),
    ("model-lone-surrogate", "POST", CHAT,
     b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', 400, "lone leading surrogate"),
    ("tool-description-lone-surrogate", "POST", CHAT, raw_chat(
        b'"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
        b'{"name": "f", "description": "\\ud83d"}}]'), 400, "hex escape"),
    ("schema-key-lone-surrogate", "POST", CHAT, raw_chat(
        b'"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
        b'"json_schema": {"name": "r", "schema": {"type": "object", "properties": {"\\ud800": {"type": "string"}}}}}'),
     400, 'hex escape'),
    ("completions-prompt-lone-surrogate", "POST", COMPLETIONS, b'{"model": "' + SMOL_NAME.encode()
     + b'", "prompt": "a\\udc00b", "max_tokens": 1}', 400, "lone leading surrogate"),
    ("body-not-utf8", "POST", CHAT, b'{"model": "\xff\xfe", "messages": []}', 400, "invalid unicode code point"),
    ("body-malformed-json", "POST", CHAT, b'{"model": ', 400, "EOF while parsing"),
    ("body-json-array", "POST", CHAT, b"[1, 2, 3]", 400, "should be an object"),
    ("body-nested-100000", "POST", CHAT, b'{"model": "' + SMOL_NAME.encode() + b'", "messages": '
     + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "recursion limit"),
    ("unknown-path", "POST", "/v1/nothing-here", chat(), 404, "Not Found"),
    ("wrong-method", "GET", CHAT, None, 405, "Method Not Allowed"),
    ("content-list-unknown-part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
     400, 'messages.0.content.0.type|literal_error'),
]


@pytest.mark.parametrize(("method", "path", "payload", "status", "rule"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_request_is_refused_cleanly_by_its_rule(hostile_server, method, path, payload, status, rule):
    raw = payload if isinstance(payload, bytes) else None
    response = send(hostile_server, method, path, body=None if raw is not None else payload, raw=raw)
    error = assert_envelope(response, status)
    assert rule in f"{error['param']}|{error['code']}|{error['message']}", error
    assert_still_serving(hostile_server)


def test_chunked_body_over_the_limit_gets_413(hostile_server):
    limit = 8 << 20
    chunks = (b"x" * (1 << 20) for _ in range(limit // (1 << 20) + 2))  # a generator: sent chunked, no length

    import httpx

    response = httpx.post(hostile_server.url + CHAT, content=chunks, timeout=60,
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_envelope(response, 413)
    assert_still_serving(hostile_server)


def test_declared_body_over_the_limit_gets_413_before_it_is_sent(hostile_server):
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(hostile_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += conn.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:"))
        while len(body) < length:
            body += conn.recv(65536)
    assert head.startswith(b"HTTP/1.1 413")
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert_still_serving(hostile_server)


def test_tiny_temperature_is_greedy(hostile_server):
    greedy = send(hostile_server, "POST", CHAT, body={**ORDINARY, "max_tokens": 8, "temperature": 0})
    tiny = send(hostile_server, "POST", CHAT, body={**ORDINARY, "max_tokens": 8, "temperature": 1e-300})
    assert tiny.status_code == greedy.status_code == 200
    text = tiny.json()["choices"][0]["message"]["content"]
    assert text and text == greedy.json()["choices"][0]["message"]["content"]


def test_recursive_schema_within_bounds_is_served(hostile_server):
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "children": {"type": "array", "maxItems": 2,
                                                          "items": {"$ref": "#"}}},
            "required": ["name"]}
    response = send(hostile_server, "POST", CHAT, body=chat(response_format=json_format(tree), max_tokens=24))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("{")
    assert_still_serving(hostile_server)


def test_long_request_id_is_replaced_and_same_ids_do_not_collide(hostile_server):
    import concurrent.futures

    long = send(hostile_server, "POST", CHAT, body=ORDINARY, headers={"x-request-id": "r" * 8000})
    assert long.status_code == 200 and len(long.headers["x-request-id"]) <= 128
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        same = list(pool.map(lambda _: send(hostile_server, "POST", CHAT, body={**ORDINARY, "max_tokens": 6},
                                            headers={"x-request-id": "same-id"}), range(4)))
    assert [r.status_code for r in same] == [200] * 4
    assert {r.headers["x-request-id"] for r in same} == {"same-id"}
    assert len({r.json()["id"] for r in same}) == 4


def test_echo_with_logprobs_and_many_choices(hostile_server):
    body = {"model": SMOL_NAME, "prompt": "word " * 600, "echo": True, "logprobs": 5, "n": 8, "max_tokens": 1}
    response = send(hostile_server, "POST", COMPLETIONS, body=body)
    assert response.status_code == 200, response.text[:300]
    choices = response.json()["choices"]
    assert len(choices) == 8
    first = choices[0]["logprobs"]
    assert first["token_logprobs"][0] is None and len(first["tokens"]) >= 600
    assert all(c["logprobs"]["token_logprobs"][:600] == first["token_logprobs"][:600] for c in choices)
    assert_still_serving(hostile_server)


def test_every_case_names_its_class():
    assert len(CASES) + 6 >= 60 and len({case[0] for case in CASES}) == len(CASES)
    assert json.dumps([case[0] for case in CASES])
