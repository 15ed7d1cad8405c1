"""Key/value metadata of a GGUF file as plain Python values (no tensors are read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata field: strings, numbers and lists as Python objects."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    return gguf_metadata(GGUFReader(str(path)))
