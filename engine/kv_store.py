"""The KV cache's tensors: every layer's keys and values by cache slot, in the model's dtype or in int8 with one fp32
scale per slot and head (``kv_cache_dtype`` "int8": about half the bytes of bf16, a quarter of fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "int8")
SCALE_BYTES = 4  # one fp32 scale per slot, head and k/v


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes one token's keys and values take over all layers."""
    per_head = config.head_dim + SCALE_BYTES if kv_cache_dtype == "int8" else config.head_dim * dtype.itemsize
    return config.num_layers * 2 * config.num_kv_heads * per_head


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows of ``x`` [..., D] and their fp32 scales [...]: q = round-half-even(x * (127 / max|x|)) in fp32, scale
    = max|x| / 127; an all-zero row gets scale 0. The native decode kernel writes the same bits."""
    x = x.float()
    peak = x.abs().amax(dim=-1)
    # a true division (``127 / tensor`` would multiply by a rounded reciprocal), as the kernel's 127.0f / amax
    inverse = torch.where(peak > 0, torch.full_like(peak, 127.0) / peak, torch.zeros_like(peak))
    return torch.round(x * inverse[..., None]).to(torch.int8), peak / 127


@dataclass
class LayerCache:
    """One layer's keys and values, [slots, kv_heads, D]; ``k_scale``/``v_scale`` [slots, kv_heads] when int8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` [N, kv_heads, D] at ``slots`` [N]."""
        if self.k_scale is None or self.v_scale is None:
            self.k.index_copy_(0, slots, keys)
            self.v.index_copy_(0, slots, values)
            return
        for cache, scales, rows in ((self.k, self.k_scale, keys), (self.v, self.v_scale, values)):
            q, scale = quantize_rows(rows)
            cache.index_copy_(0, slots, q)
            scales.index_copy_(0, slots, scale)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` [N], [N, kv_heads, D] in ``dtype``."""
        keys, values = self.k.index_select(0, slots), self.v.index_select(0, slots)
        if self.k_scale is None or self.v_scale is None:
            return keys, values
        return ((keys.float() * self.k_scale.index_select(0, slots)[..., None]).to(dtype),
                (values.float() * self.v_scale.index_select(0, slots)[..., None]).to(dtype))


class KVCache:
    """All layers' keys and values: ``data`` [layers, 2, slots, kv_heads, D] in ``dtype`` (or int8, with ``scales``
    [layers, 2, slots, kv_heads] fp32); ``layers`` one ``LayerCache`` view per layer."""

    def __init__(self, config: ModelConfig, slots: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
        quantized = kv_cache_dtype == "int8"
        shape = (config.num_layers, 2, slots, config.num_kv_heads)
        self.data = torch.zeros(*shape, config.head_dim, dtype=torch.int8 if quantized else dtype, device=device)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=device) if quantized else None
        self.layers = [LayerCache(self.data[i, 0], self.data[i, 1],
                                  *((self.scales[i, 0], self.scales[i, 1]) if self.scales is not None else ()))
                       for i in range(config.num_layers)]
