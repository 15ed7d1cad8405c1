"""Responses and Messages requests translated into the chat request the planner runs, and the bounded store of
responses."""

from __future__ import annotations

import logging

import pytest

from server.errors import APIError
from server.messages_request import MessagesRequest
from server.messages_request import to_chat as messages_to_chat
from server.response_store import ResponseStore
from server.responses_request import ResponsesRequest, conversation
from server.responses_request import to_chat as responses_to_chat

TOOL = {"type": "function", "name": "shell", "description": "Run a command.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}


def responses(**body) -> tuple[ResponsesRequest, list[dict]]:
    request = ResponsesRequest.model_validate({"model": "m", **body})
    return request, conversation(request, [])


def test_a_responses_conversation_becomes_chat_turns_with_calls_and_results():
    request, messages = responses(instructions="Be brief.", tools=[TOOL, {"type": "web_search"}], input=[
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"role": "user", "content": "list files"},
        {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": '{"cmd": "ls"}'},
        {"type": "function_call", "call_id": "c2", "name": "shell", "arguments": '{"cmd": "pwd"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "/tmp"}]},
        {"type": "item_reference", "id": "x"}])
    assert messages == [
        {"role": "developer", "content": "rules"}, {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": '{"cmd": "ls"}'}},
            {"id": "c2", "type": "function", "function": {"name": "shell", "arguments": '{"cmd": "pwd"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "shell", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "c2", "name": "shell", "content": "/tmp"}]
    chat = responses_to_chat(request, messages)
    assert chat.messages[0].role == "system" and chat.messages[0].text() == "Be brief."
    assert [t.function.name for t in chat.tools or []] == ["shell"]  # web_search skipped, not refused
    assert chat.calls_allowed and not chat.call_required


def test_a_stored_history_is_continued_and_never_changed():
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{}"}}]}]
    request = ResponsesRequest.model_validate({"model": "m", "input": [
        {"type": "function_call", "call_id": "c2", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]})
    messages = conversation(request, history)
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert [c["id"] for c in history[1]["tool_calls"]] == ["c1"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "c1", "name": "shell", "content": "ok"}


@pytest.mark.parametrize(("effort", "thinking"), [("none", False), ("minimal", False), ("low", True),
                                                  ("high", True), (None, None)])
def test_reasoning_effort_turns_thinking_on_or_off(effort, thinking):
    request, messages = responses(input="hi", **({"reasoning": {"effort": effort}} if effort else {}))
    kwargs = responses_to_chat(request, messages).chat_template_kwargs
    assert (kwargs or {}).get("enable_thinking") == thinking


def test_text_format_and_named_tool_choice_reach_the_chat_request():
    request, messages = responses(input="hi", tools=[TOOL], tool_choice={"type": "function", "name": "shell"})
    assert responses_to_chat(request, messages).forced_function == "shell"
    request, messages = responses(input="hi", text={"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object"}}})
    chat = responses_to_chat(request, messages)
    assert chat.response_format is not None and chat.response_format.json_schema.schema_ == {"type": "object"}


@pytest.mark.parametrize("items", [
    [{"type": "function_call_output", "call_id": "nope", "output": "x"}],
    [{"type": "message", "content": "no role"}],
    [{"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}],
    [{"type": "function_call", "name": "shell", "arguments": "{}"}],
])
def test_responses_inputs_that_cannot_run_are_a_400(items):
    request = ResponsesRequest.model_validate({"model": "m", "input": items})
    with pytest.raises(APIError) as error:
        conversation(request, [])
    assert error.value.status == 400 and error.value.param.startswith("input")


def anthropic(**body) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 64, **body})


def test_anthropic_messages_fold_system_turns_and_map_tool_blocks():
    body = anthropic(system=[{"type": "text", "text": "You are Claude Code."}], messages=[
        {"role": "system", "content": "Extra rules."},
        {"role": "user", "content": [{"type": "text", "text": "ls", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I will list.", "signature": "sig"},
            {"type": "text", "text": "Listing."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a.txt"}]},
            {"type": "text", "text": "and now?"}]},
    ], tools=[{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}},
              {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True}, thinking={"type": "disabled"},
        stop_sequences=["END"])
    chat = messages_to_chat(body)
    roles = [(m.role, m.text()) for m in chat.messages]
    assert roles == [("system", "You are Claude Code.\n\nExtra rules."), ("user", "ls"), ("assistant", "Listing."),
                     ("tool", "a.txt"), ("user", "and now?")]
    call = chat.messages[2].tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("t1", "Bash", '{"command": "ls"}')
    assert chat.messages[3].tool_call_id == "t1" and chat.messages[3].name == "Bash"
    assert [t.function.name for t in chat.tools] == ["Bash"]
    assert (chat.tool_choice, chat.parallel_tool_calls) == ("required", False)
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert (chat.stop, chat.max_tokens) == (["END"], 64)


def test_an_error_result_is_marked_and_a_named_tool_is_forced():
    body = anthropic(messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "denied",
                                      "is_error": True}]}],
        tools=[{"name": "Bash"}], tool_choice={"type": "tool", "name": "Bash"})
    chat = messages_to_chat(body)
    assert chat.messages[-1].text() == "Error: denied" and chat.forced_function == "Bash"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "ghost", "content": "x"}]}],
    [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AA"}}]}],
    [{"role": "assistant", "content": [{"type": "tool_use", "name": "Bash", "input": {}}]}],
])
def test_anthropic_blocks_that_cannot_run_are_a_400(messages):
    with pytest.raises(APIError) as error:
        messages_to_chat(anthropic(messages=messages))
    assert error.value.status == 400 and error.value.param.startswith("messages.")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(size: int) -> tuple[dict, list]:
    return {"text": "x" * size}, []


def test_the_store_evicts_oldest_first_to_stay_in_its_budget():
    store = ResponseStore(max_bytes=1000, max_age=60)
    for name in "abc":
        assert store.put(name, None, *entry(300))
    assert store.size <= 1000 and len(store) == 3
    store.put("d", None, *entry(300))
    assert store.get("a", None) is None and store.get("d", None) is not None
    assert len(store) == 3 and store.size <= 1000
    assert not store.put("huge", None, *entry(2000))  # larger than the whole budget: not kept, nothing evicted
    assert len(store) == 3


def test_the_store_forgets_entries_past_their_age():
    clock = Clock()
    store = ResponseStore(max_bytes=10_000, max_age=60, clock=clock)
    store.put("old", None, *entry(10))
    clock.now = 30
    store.put("new", None, *entry(10))
    clock.now = 61
    assert store.get("old", None) is None and store.get("new", None) is not None
    clock.now = 91
    assert store.get("new", None) is None and store.size == 0


def test_one_owner_cannot_read_or_delete_anothers_response():
    store = ResponseStore(max_bytes=10_000, max_age=60)
    store.put("r", "alice", *entry(10))
    assert store.get("r", "bob") is None and not store.delete("r", "bob") and store.get("r", None) is None
    assert store.get("r", "alice") is not None and store.delete("r", "alice") and store.get("r", "alice") is None


def test_unknown_fields_are_ignored_and_named_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="qwen_serve")
    request, messages = responses(input="hi", future_field={"x": 1}, service_tier="auto")
    responses_to_chat(request, messages)
    messages_to_chat(anthropic(messages=[{"role": "user", "content": "hi"}], context_management={"edits": []}))
    assert "responses: ignored fields 'future_field', 'service_tier'" in caplog.text
    assert "messages: ignored fields 'context_management'" in caplog.text
