"""``qwen-serve chat`` driven through a pseudo-terminal (pexpect) against a real server: a streamed answer,
multi-line input, Ctrl-C that stops a reply (and the request: the running gauge returns to 0) but not the
program, ``/reset``, ``/save`` and Ctrl-D."""

from __future__ import annotations

import json
import signal
import sys

import pexpect
import pytest

from tests.integration.conftest import API_KEY, SMOL_NAME, wait_for


def spawn(*args: str, sigint_ignored: bool = False) -> pexpect.spawn:
    """``sigint_ignored``: started as from a parent that ignores SIGINT (a disposition children inherit)."""
    return pexpect.spawn(sys.executable, ["-m", "server.cli", "chat", *args], encoding="utf-8", timeout=120,
                         dimensions=(40, 120), env={"TERM": "xterm", "PATH": "/usr/bin:/bin"},
                         preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)


def exit_status(chat: pexpect.spawn) -> int | None:
    """The program's exit status once it ended by itself (after its output closed, it may still be exiting)."""
    chat.expect(pexpect.EOF)
    status = chat.wait()
    chat.close()
    return status


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored-by-parent"])
def test_a_terminal_chat_streams_stops_and_keeps_going(smol_server, tmp_path, sigint_ignored):
    chat = spawn("--url", smol_server.url, "--temperature", "0", "--max-tokens", "1500", sigint_ignored=sigint_ignored)
    try:
        chat.expect(f"Chatting with {SMOL_NAME}")
        chat.expect("› ")
        chat.sendline("Which city is the capital \\")  # a backslash continues the message on the next line
        chat.expect("  ")
        chat.sendline("of Germany?")
        chat.expect("Berlin")
        chat.expect("› ")

        chat.sendline("Write a very long story about a dragon.")  # greedy: longer than 1,500 tokens
        chat.expect("dragon")  # the terminal's echo of the line
        chat.expect("dragon")  # the reply, streaming
        wait_for(lambda: smol_server.metric("vllm:num_requests_running") == 1)
        chat.sendintr()
        chat.expect_exact("[stopped]")
        chat.expect("› ")
        wait_for(lambda: smol_server.metric("vllm:num_requests_running") == 0)

        saved = tmp_path / "chat.json"
        chat.sendline(f"/save {saved}")
        chat.expect_exact("(saved to")
        conversation = json.loads(saved.read_text())
        roles = [m["role"] for m in conversation["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert conversation["messages"][0]["content"] == "Which city is the capital \nof Germany?"
        assert "Berlin" in conversation["messages"][1]["content"]
        assert conversation["messages"][3]["content"]  # the stopped reply's text stays in the conversation

        chat.sendline("/reset")
        chat.expect_exact("(conversation reset)")
        chat.sendline(f"/save {saved}")
        chat.expect_exact("(saved to")
        chat.expect("› ")
        assert json.loads(saved.read_text())["messages"] == []

        chat.sendintr()  # at the prompt: a fresh prompt, not an exit
        chat.expect("› ")
        chat.sendeof()
        assert exit_status(chat) == 0
    finally:
        chat.close()


def test_a_server_that_refuses_ends_it_with_the_servers_message(smol_server):
    chat = spawn("--url", smol_server.url + "/nowhere")
    assert exit_status(chat) != 0 and "qwen-serve chat: 404" in chat.before


def test_help_describes_the_options():
    chat = spawn("--help")
    chat.expect(pexpect.EOF)
    assert "--url" in chat.before and "--model" in chat.before and "--api-key" in chat.before


def test_an_api_key_is_sent_and_a_missing_one_reported(keyed_server):
    refused = spawn("--url", keyed_server.url)
    assert exit_status(refused) != 0 and "401" in refused.before
    chat = spawn("--url", keyed_server.url, "--api-key", API_KEY, "--temperature", "0")
    chat.expect(f"Chatting with {SMOL_NAME}")
    chat.sendline("Which city is the capital of Germany?")
    chat.expect("Berlin")
    chat.expect("› ")
    chat.sendeof()
    assert exit_status(chat) == 0


def test_a_model_served_in_process(smollm2_gguf):
    chat = spawn("--model", str(smollm2_gguf), "--temperature", "0")
    chat.expect("Chatting with", timeout=300)
    chat.sendline("Which city is the capital of Germany?")
    chat.expect("Berlin")
    chat.expect("› ")
    chat.sendline("/exit")
    assert exit_status(chat) == 0
