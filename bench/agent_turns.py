"""An agent's second turn against its first, through the Responses API: the first turn sends ~20 KB of
instructions and a question, the second continues it (``previous_response_id``, as a stored conversation) or
resends the whole history (``store: false``, as Codex does); the second should find the first's prompt in the
prefix cache. Prints each turn's time to the first output event and its ``cached_tokens``.

Usage: python bench/agent_turns.py [--model FILE.gguf] [--instructions-kb 20] [--port 8123]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import openai
from servers import cpu_model, wait_healthy

QUESTION = "Which file holds the server's settings?"
FOLLOW_UP = "And which one holds the limits?"


def instructions(kilobytes: int) -> str:
    """Agent-like instructions: numbered rules, ``kilobytes`` long."""
    rules, index = [], 0
    while sum(len(rule) for rule in rules) < kilobytes * 1024:
        index += 1
        rules.append(f"{index}. When you change file number {index}, run its tests and keep the style of the code "
                     f"around it; never touch generated files or the lock files (rule {index}).\n")
    return "".join(rules)


def turn(client: openai.OpenAI, model: str, **request) -> tuple[float, openai.types.responses.Response]:
    """Seconds to the first output delta, and the whole response."""
    started, first, last = time.perf_counter(), None, None
    with client.responses.stream(model=model, max_output_tokens=16, temperature=0, **request) as stream:
        for last in stream:
            if first is None and last.type.endswith(".delta"):
                first = time.perf_counter() - started
    assert last is not None and last.type in ("response.completed", "response.incomplete"), last
    return first or time.perf_counter() - started, last.response  # the ending event carries the response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--instructions-kb", type=int, default=20)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    command = [sys.executable, "-m", "server.cli", "--port", str(args.port), "--served-model-name", "bench"]
    server = subprocess.Popen([*command, *(["--model", args.model] if args.model else [])])
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, server)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        rules = instructions(args.instructions_kb)
        print(f"host: {cpu_model()}; instructions {len(rules)} characters")
        first_ttft, first = turn(client, "bench", instructions=rules, input=QUESTION)
        stored_ttft, stored = turn(client, "bench", instructions=rules, input=FOLLOW_UP,
                                   previous_response_id=first.id)
        history = [{"role": "user", "content": QUESTION}, *[item.model_dump() for item in first.output],
                   {"role": "user", "content": FOLLOW_UP}]
        resent_ttft, resent = turn(client, "bench", instructions=rules, input=history, store=False)
        for name, ttft, response in (("turn 1", first_ttft, first), ("turn 2, stored", stored_ttft, stored),
                                     ("turn 2, resent", resent_ttft, resent)):
            usage = response.usage
            print(f"{name:>15}: first output {ttft * 1000:8.1f} ms; prompt {usage.input_tokens} tokens, "
                  f"{usage.input_tokens_details.cached_tokens} cached; {first_ttft / ttft:5.1f}x turn 1")
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
