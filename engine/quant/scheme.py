"""Which quantization a checkpoint uses, read from its ``quantization_config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuantScheme:
    """``method`` "gptq" or "awq"; ``zero_offset`` is what GPTQ's v1 format subtracted from stored zero points."""

    method: str
    bits: int
    group_size: int
    zero_offset: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantScheme:
        method = str(config.get("quant_method", "")).lower()
        bits, group_size = int(config.get("bits", 4)), int(config.get("group_size", 128))
        if method == "gptq":
            if bits not in (2, 4, 8):
                raise ValueError(f"GPTQ with {bits} bits is not supported (2, 4 or 8)")
            # AutoGPTQ's v1 layout stores zero_point - 1; "gptq_v2" stores the zero point itself.
            v2 = config.get("checkpoint_format", "gptq") == "gptq_v2"
            return cls("gptq", bits, group_size, zero_offset=0 if v2 else 1)
        if method == "awq":
            version = str(config.get("version", "gemm")).lower()
            if version != "gemm" or bits != 4 or not config.get("zero_point", True):
                raise ValueError(f"AWQ {version} with {bits} bits (zero_point={config.get('zero_point')}) is not "
                                 f"supported; supported: GEMM, 4 bits, with zero points")
            return cls("awq", bits, group_size)
        raise ValueError(f"{method or 'unknown'} checkpoints are not supported; supported: gptq, awq")
