"""``qwen-serve chat``: an interactive terminal chat over the public ``/v1`` API, against a running server
(``--url``) or a model served in this process for the session (``--model``).

Replies stream, rendered as Markdown (rich); a thinking model's reasoning shows dimmed above the answer. Input
lines ending in ``\\`` continue on the next line. Ctrl-C stops a reply (the request is aborted; the part already
written stays in the conversation) and at the prompt clears it; Ctrl-D or ``/exit`` leaves. ``/reset`` forgets
the conversation, ``/system TEXT`` sets the system prompt (empty: none), ``/save FILE`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /save FILE, /exit (or Ctrl-D)"


class ChatError(RuntimeError):
    """The server refused a request (its OpenAI error message)."""


@dataclass
class Conversation:
    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def request_messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"system": self.system, "messages": self.messages}, indent=2, ensure_ascii=False))


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    stopped: bool = False

    def view(self) -> Group:
        parts = [Text(self.reasoning, style="dim italic")] if self.reasoning else []
        return Group(*parts, Markdown(self.content or ""))


class ChatClient:
    """Chat completions streamed from ``url`` (the server's root)."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def model(self) -> str:
        response = self.http.get("/v1/models")
        _check(response)
        return response.json()["data"][0]["id"]

    def stream(self, body: dict) -> Iterator[dict]:
        """Each chunk of a streamed completion; closing the iterator closes the connection (the server aborts)."""
        with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(chunk["error"]["message"])
                yield chunk


def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text or response.reason_phrase
        raise ChatError(f"{response.status_code}: {message}")


def read_message(prompt: Callable[[str], str]) -> str:
    """One message: lines ending in a backslash continue."""
    lines = []
    text = prompt("› ")
    while text.endswith("\\"):
        lines.append(text[:-1])
        text = prompt("  ")
    lines.append(text)
    return "\n".join(lines).strip()


def generate(client: ChatClient, body: dict, console: Console) -> Reply:
    """Stream one reply onto the console; Ctrl-C stops it."""
    reply = Reply()
    chunks = client.stream(body)
    try:  # a Ctrl-C while the reply is on screen stops it, also while its last part is still being drawn
        with Live(reply.view(), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
            try:
                for chunk in chunks:
                    for choice in chunk["choices"]:
                        delta = choice["delta"]
                        reply.content += delta.get("content") or ""
                        reply.reasoning += delta.get("reasoning_content") or ""
                    live.update(reply.view())
            finally:
                chunks.close()
            live.update(reply.view())
    except KeyboardInterrupt:
        reply.stopped = True
    if reply.stopped:
        console.print("[stopped]", style="yellow", markup=False)
    return reply


def run(client: ChatClient, args: argparse.Namespace, console: Console,
        prompt: Callable[[str], str] = input) -> None:
    session = ChatSession(client, client.model(), args, console)
    console.print(f"Chatting with {session.model}. {HELP}", style="bold", markup=False)
    while True:
        try:
            if not session.handle(read_message(prompt)):
                return
        except KeyboardInterrupt:  # at the prompt (or between two commands): a fresh prompt, not an exit
            with contextlib.suppress(KeyboardInterrupt):
                console.print()
        except EOFError:
            console.print()
            return


class ChatSession:
    """One conversation: commands and messages in, replies out."""

    def __init__(self, client: ChatClient, model: str, args: argparse.Namespace, console: Console) -> None:
        self.client, self.model, self.args, self.console = client, model, args, console
        self.conversation = Conversation(system=args.system or "")

    def handle(self, text: str) -> bool:
        """Act on one input; False when the user leaves."""
        command, _, rest = text.partition(" ")
        if not text:
            return True
        if command == "/exit":
            return False
        if command == "/reset":
            self.conversation.messages.clear()
            self._note("(conversation reset)")
        elif command == "/system":
            self.conversation.system = rest.strip()
            self._note(f"(system prompt {'set' if self.conversation.system else 'cleared'})")
        elif command == "/save":
            if rest.strip():
                self.conversation.save(Path(rest.strip()))
                self._note(f"(saved to {rest.strip()})")
            else:
                self.console.print("usage: /save FILE", style="red", markup=False)
        else:
            self._ask(text)
        return True

    def _note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def _ask(self, text: str) -> None:
        messages = self.conversation.messages
        messages.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.conversation.request_messages(),
                "max_tokens": self.args.max_tokens}
        if self.args.temperature is not None:
            body["temperature"] = self.args.temperature
        try:
            reply = generate(self.client, body, self.console)
        except (ChatError, httpx.HTTPError) as exc:
            messages.pop()
            self.console.print(f"error: {exc}", style="red", markup=False)
            return
        messages.append({"role": "assistant", "content": reply.content})


@contextlib.contextmanager
def local_server(model: str) -> Iterator[str]:
    """Serve ``model`` on a free loopback port for the session; yields its URL."""
    import uvicorn

    from server.app import create_app
    from server.settings import load_settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings({"model": model, "port": port, "ui": False, "log_level": "warning"})
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not _healthy(url):
            if not thread.is_alive():
                raise SystemExit("qwen-serve chat: the model failed to load")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-serve chat", description="Chat in the terminal.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (default: %(default)s)")
    where.add_argument("--model", help="serve this model in this process for the session instead")
    parser.add_argument("--api-key", help="the server's API key, if it has keys")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=1024, help="per reply (default: %(default)s)")
    parser.add_argument("--temperature", type=float, help="default: the model's")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    # Ctrl-C stops a reply even when this process was started with SIGINT ignored (a parent's disposition is
    # inherited, and Python then installs no handler of its own): without one, the reply ran to its end
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console(highlight=False)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(local_server(args.model)) if args.model else args.url
        try:
            run(ChatClient(url, args.api_key), args, console)
        except (ChatError, httpx.HTTPError) as exc:
            raise SystemExit(f"qwen-serve chat: {exc}") from exc
