"""Key/value metadata of a GGUF file as plain Python values (no tensors are read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader


class MappedReader(GGUFReader):
    """The ``gguf`` library's reader over a plain ndarray view of its memory map: numpy's ``memmap`` subclass runs
    Python code on every slice, and the reader slices once per vocabulary string (seconds for 150K tokens)."""

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = np.asarray(value)  # the same pages; the memmap stays referenced as the view's base


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata field: strings, numbers and lists as Python objects."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    return gguf_metadata(MappedReader(str(path)))
