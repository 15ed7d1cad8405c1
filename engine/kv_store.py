"""The KV cache's tensors: every layer's keys and values by cache slot, in the model's dtype, or in 8 bits with one
fp32 scale per slot and head (``kv_cache_dtype`` "int8" or "fp8" (e4m3): about half the bytes of bf16, a quarter of
fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
EIGHT_BIT = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # the 8-bit formats and how their values are stored
SCALE_BYTES = 4  # one fp32 scale per slot, head and k/v
LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest magnitude each format holds


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes one token's keys and values take over all attention layers."""
    per_head = config.head_dim + SCALE_BYTES if kv_cache_dtype in EIGHT_BIT else config.head_dim * dtype.itemsize
    return config.num_attention_layers * 2 * config.num_kv_heads * per_head


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit rows of ``x`` [..., D] and their fp32 scales [...]: x * (L / max|x|) in fp32, rounded half to even into
    ``dtype`` (int8, L = 127: the native decode kernel writes the same bits; fp8 e4m3, L = 448), scale = max|x| / L;
    an all-zero row gets scale 0."""
    x = x.float()
    peak = x.abs().amax(dim=-1)
    largest = LARGEST[dtype]
    # a true division (``127 / tensor`` would multiply by a rounded reciprocal), as the kernel's 127.0f / amax
    inverse = torch.where(peak > 0, torch.full_like(peak, largest) / peak, torch.zeros_like(peak))
    scaled = x * inverse[..., None]
    return (torch.round(scaled) if dtype == torch.int8 else scaled).to(dtype), peak / largest


@dataclass
class LayerCache:
    """One layer's keys and values, [slots, kv_heads, D]; ``k_scale``/``v_scale`` [slots, kv_heads] when 8-bit."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def fp8(self) -> bool:
        return self.k.dtype == torch.float8_e4m3fn

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` [N, kv_heads, D] at ``slots`` [N]."""
        if self.k_scale is None or self.v_scale is None:
            self.k.index_copy_(0, slots, keys)
            self.v.index_copy_(0, slots, values)
            return
        for cache, scales, rows in ((self.k, self.k_scale, keys), (self.v, self.v_scale, values)):
            q, scale = quantize_rows(rows, cache.dtype)
            cache.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))  # bits as they are (no fp8 CPU copy)
            scales.index_copy_(0, slots, scale)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` [N], [N, kv_heads, D] in ``dtype``."""
        if self.k_scale is None or self.v_scale is None:
            return self.k.index_select(0, slots), self.v.index_select(0, slots)
        keys, values = (c.view(torch.uint8).index_select(0, slots).view(c.dtype) for c in (self.k, self.v))
        return ((keys.float() * self.k_scale.index_select(0, slots)[..., None]).to(dtype),
                (values.float() * self.v_scale.index_select(0, slots)[..., None]).to(dtype))


class KVCache:
    """All attention layers' keys and values: ``data`` [layers, 2, slots, kv_heads, D] in ``dtype`` (or int8/fp8,
    with ``scales`` [layers, 2, slots, kv_heads] fp32); ``layers`` one ``LayerCache`` view per attention layer (a
    hybrid model's linear layers keep none)."""

    def __init__(self, config: ModelConfig, slots: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
        quantized = kv_cache_dtype in EIGHT_BIT
        shape = (config.num_attention_layers, 2, slots, config.num_kv_heads)
        self.data = torch.zeros(*shape, config.head_dim, dtype=EIGHT_BIT.get(kv_cache_dtype, dtype), device=device)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=device) if quantized else None
        self.layers = [LayerCache(self.data[i, 0], self.data[i, 1],
                                  *((self.scales[i, 0], self.scales[i, 1]) if self.scales is not None else ()))
                       for i in range(config.num_attention_layers)]
