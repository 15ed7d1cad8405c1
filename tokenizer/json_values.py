"""JSON values from untrusted text (request fields, model replies): parsed strictly, walked without recursion."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

Path = tuple[str | int, ...]


class JsonTooDeepError(ValueError):
    """JSON nested deeper than Python's parser can follow."""


def loads_strict(text: str) -> Any:
    """``text`` as a JSON value that can be written back as JSON: ``ValueError`` for invalid JSON, ``NaN`` and
    ``Infinity`` (or numbers that overflow to them), integers past Python's digit limit and nesting too deep to
    parse."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise JsonTooDeepError("JSON nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


def walk(value: Any) -> Iterator[tuple[Path, Any]]:
    """Every node of a JSON-like value with its path from the root, depth first, without recursion (so no
    nesting can exhaust the stack); a caller bounds the depth by ``len(path)``."""
    stack: list[tuple[Path, Any]] = [((), value)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, dict):
            stack.extend(((*path, str(key)), item) for key, item in reversed(node.items()))
        elif isinstance(node, list | tuple):
            stack.extend(((*path, index), item) for index, item in reversed(list(enumerate(node))))


def strings(value: Any) -> Iterator[tuple[Path, str]]:
    """Every string of a JSON-like value, object keys included, with its path."""
    for path, node in walk(value):
        if isinstance(node, str):
            yield path, node
        elif isinstance(node, dict):
            yield from (((*path, key), key) for key in node if isinstance(key, str))


def path_text(path: Path) -> str:
    """``a.b[2].c`` for a path."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
