"""The Responses and Messages APIs over a socket with the official SDKs (``openai``, ``anthropic``): a scripted
thinking model that calls a tool (``tests.integration.scripted``) and the embedded model; streamed and whole
replies agree, stored responses continue and stay with their key, a cancel stops generation."""

from __future__ import annotations

import contextlib
import json
import threading

import anthropic
import httpx
import openai
import pytest

import server.routes.responses
from engine import EngineConfig
from server.settings import Settings
from server.streaming import serialized
from tests.integration.conftest import SMOL_NAME, RunningServer, serve, wait_for
from tests.integration.scripted import scripted_fixture
from tokenizer.chat import builtin_template

QWEN3 = builtin_template("qwen3")
CALL_SCRIPT = ["<think>", "\nI need the weather.", "\n</think>\n\n", "<tool_call>\n",
               '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n</tool_call>"]
TEXT_SCRIPT = ["<think>", "\nThe user greets me.", "\n</think>\n\n", "Hello", " there", "!"]
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Weather in a city.",
                     "input_schema": WEATHER_TOOL["parameters"]}
GREEDY = {"temperature": 0}
BLOCK = EngineConfig().block_size

caller = scripted_fixture(CALL_SCRIPT, QWEN3, model_aliases=["claude-sonnet-4-5"])
talker = scripted_fixture(TEXT_SCRIPT, QWEN3)


def keyed(settings: Settings, beside: RunningServer):
    """Another server (``settings``) on the engine of ``beside``, while the context lasts."""
    return contextlib.contextmanager(serve)(settings, beside.engine)


def responses_client(server: RunningServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key=key, max_retries=0, timeout=120)


def anthropic_client(server: RunningServer, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


# -- Responses -------------------------------------------------------------------------------------------------


def test_a_response_with_a_call_has_reasoning_then_the_call(caller):
    response = responses_client(caller).responses.create(model="scripted", input="Weather in Paris?",
                                                         tools=[WEATHER_TOOL], **GREEDY)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].content[0].text == "I need the weather."
    call = response.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert call.call_id.startswith("call_")
    usage = response.usage
    assert usage.output_tokens == len(CALL_SCRIPT) + 1  # and <|im_end|>
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_a_streamed_response_folds_into_the_same_items(caller):
    client = responses_client(caller)
    with client.responses.stream(model="scripted", input="Weather in Paris?", tools=[WEATHER_TOOL],
                                 **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert reasoning == final.output[0].content[0].text == "I need the weather."
    assert arguments == final.output[1].arguments and json.loads(arguments) == {"city": "Paris"}
    whole = client.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER_TOOL], **GREEDY)
    assert without_ids(final.output) == without_ids(whole.output)


def test_a_streamed_responses_closing_events_are_serialized_off_the_event_loop(caller, monkeypatch):
    """The last event holds the whole response: it is made on the preparation pool, as whole replies are."""
    threads: list[str] = []

    def recording(event):
        threads.append(threading.current_thread().name)
        return serialized(event)

    monkeypatch.setattr(server.routes.responses, "serialized", recording)
    with responses_client(caller).responses.stream(model="scripted", input="hi", **GREEDY) as stream:
        assert list(stream)[-1].type == "response.completed"
    assert threads and all(name.startswith("qwen-serve-prep") for name in threads), threads


def without_ids(items: list) -> list[dict]:
    """Output items without what is fresh each time (ids) or added by the SDK's stream reader."""
    return [{k: v for k, v in item.model_dump().items() if k not in ("id", "call_id", "parsed_arguments")}
            for item in items]


def test_a_stored_response_is_continued_read_back_and_deleted(caller):
    client = responses_client(caller)
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER_TOOL], **GREEDY)
    call = first.output[1]
    second = client.responses.create(model="scripted", previous_response_id=first.id, tools=[WEATHER_TOOL],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": '{"sky": "clear"}'}], **GREEDY)
    assert second.status == "completed" and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    cached = second.usage.input_tokens_details.cached_tokens  # the prefix cache, whole blocks of 16 tokens
    assert cached == first.usage.input_tokens // BLOCK * BLOCK
    assert client.responses.retrieve(first.id).output[1].arguments == call.arguments
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="scripted", previous_response_id=first.id, input="again")


def test_a_response_not_stored_cannot_be_continued(caller):
    client = responses_client(caller)
    response = client.responses.create(model="scripted", input="hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_a_response_cut_by_max_output_tokens_is_incomplete(caller):
    response = responses_client(caller).responses.create(model="scripted", input="hi", max_output_tokens=2,
                                                         **GREEDY)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[-1].status == "incomplete"


def test_unknown_fields_and_tool_types_are_skipped_not_refused(caller):
    body = {"model": "scripted", "input": "Weather?", "temperature": 0, "store": False, "include": ["x"],
            "prompt_cache_key": "k", "service_tier": "auto", "some_future_field": {"a": 1},
            "tools": [WEATHER_TOOL, {"type": "web_search"}, {"type": "custom", "name": "apply_patch"},
                      {"type": "namespace", "name": "mcp"}, {"type": "local_shell"}]}
    reply = httpx.post(f"{caller.base}/responses", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert [t["name"] for t in reply.json()["tools"]] == ["get_weather"]


def test_responses_with_keys_belong_to_their_key(caller):
    with_keys = Settings(served_model_name="scripted", api_key=["alice-key", "bob-key"])
    with keyed(with_keys, caller) as server:
        _owned_by_their_key(server)


def _owned_by_their_key(server: RunningServer) -> None:
    alice, bob = responses_client(server, "alice-key"), responses_client(server, "bob-key")
    response = alice.responses.create(model="scripted", input="hi", **GREEDY)
    assert alice.responses.retrieve(response.id).id == response.id
    for attempt in (lambda: bob.responses.retrieve(response.id), lambda: bob.responses.delete(response.id),
                    lambda: bob.responses.create(model="scripted", input="x", previous_response_id=response.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert alice.responses.retrieve(response.id).id == response.id


def test_cancel_stops_a_running_response(smol_server):
    client = responses_client(smol_server)
    seen: dict = {}

    def run() -> None:
        with client.responses.stream(model=SMOL_NAME, input="Write a very long story about a dragon.",
                                     max_output_tokens=1500, temperature=0) as stream:
            for event in stream:
                if event.type == "response.created":
                    seen["id"] = event.response.id
                seen["last"] = event

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: "id" in seen and smol_server.metric("vllm:num_requests_running") == 1, what="running")
    cancelled = httpx.post(f"{smol_server.base}/responses/{seen['id']}/cancel", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    wait_for(lambda: smol_server.metric("vllm:num_requests_running") == 0, seconds=30, what="the abort")
    thread.join(30)
    assert seen["last"].type == "response.incomplete" and seen["last"].response.status == "cancelled"
    assert seen["last"].response.usage.output_tokens < 1500


# -- Messages ----------------------------------------------------------------------------------------------------


def test_a_message_with_a_call_has_thinking_then_tool_use(caller):
    client = anthropic_client(caller)
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                     messages=[{"role": "user", "content": "Weather in Paris?"}],
                                     thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    assert message.content[0].thinking == "I need the weather."
    use = message.content[1]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use" and message.model == "claude-sonnet-4-5"
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}],
                                extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert [b.model_dump(exclude={"id"}) for b in streamed.content] == \
        [b.model_dump(exclude={"id"}) for b in message.content]
    assert streamed.stop_reason == "tool_use" and streamed.usage.output_tokens == message.usage.output_tokens


def test_a_tool_result_continues_and_the_prefix_is_read_from_the_cache(caller):
    client = anthropic_client(caller)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                   messages=ask, extra_body=GREEDY)
    use = first.content[-1]
    turn = [*ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                    messages=turn, extra_body=GREEDY)
    assert second.usage.cache_read_input_tokens > 0
    counted = client.messages.count_tokens(model="claude-sonnet-4-5", tools=[ANTHROPIC_WEATHER], messages=turn)
    assert counted.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens


def test_a_stop_sequence_is_named(talker):
    message = anthropic_client(talker).messages.create(
        model="scripted", max_tokens=64, stop_sequences=[" there"], messages=[{"role": "user", "content": "hi"}],
        extra_body=GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " there")
    assert message.content[-1].text == "Hello"


def test_count_tokens_matches_the_chat_prompt(talker):
    chat = httpx.post(f"{talker.base}/chat/completions", json={
        "model": "scripted", "max_tokens": 1, "messages": [{"role": "system", "content": "Be kind."},
                                                           {"role": "user", "content": "hi"}]}, timeout=60).json()
    counted = anthropic_client(talker).messages.count_tokens(model="scripted", system="Be kind.",
                                                             messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]


def test_messages_errors_take_anthropics_envelope(caller, talker):
    client = anthropic_client(talker)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-opus-4", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="scripted", max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    reply = httpx.post(f"{caller.url}/v1/messages?beta=true", headers={"anthropic-version": "2023-06-01",
                       "anthropic-beta": "x"}, json={"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": [
                           {"role": "user", "content": "hi"}], "metadata": {"user_id": "u"}}, timeout=60)
    assert reply.status_code == 200 and reply.json()["type"] == "message"


def test_messages_accept_x_api_key_and_refuse_others_in_anthropics_envelope(caller):
    with keyed(Settings(served_model_name="scripted", api_key=["sesame"]), caller) as server:
        _keys_on_messages(server)


def _keys_on_messages(server: RunningServer) -> None:
    body = {"model": "scripted", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert anthropic_client(server, "sesame").messages.create(**body).type == "message"
    for headers in ({"x-api-key": "wrong"}, {}):
        reply = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=30)
        assert reply.status_code == 401
        assert reply.json() == {"type": "error", "error": {"type": "authentication_error",
                                                           "message": "missing or invalid API key"}}
    assert httpx.post(f"{server.url}/v1/messages", json=body, timeout=30,
                      headers={"Authorization": "Bearer sesame"}).status_code == 200
