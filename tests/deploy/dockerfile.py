"""A small reader of Dockerfile instructions, for tests that check the images and replay their steps."""

from __future__ import annotations

import shlex


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, arg = line.partition(" ")
        steps.append((op.upper(), " ".join(arg.split())))
    return steps


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ENV of a stage, ``$VAR`` references to earlier values expanded (others left as written)."""
    env: dict[str, str] = {}
    for op, arg in steps:
        if op == "ENV":
            for item in shlex.split(arg):
                key, _, value = item.partition("=")
                for name, known in env.items():
                    value = value.replace(f"${name}", known)
                env[key] = value
    return env
