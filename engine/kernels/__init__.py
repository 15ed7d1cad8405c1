"""Attention and matmul kernels beyond torch's own: native CPU kernels built for the host on first use (``native``:
quantized matmuls ``q4q8`` and ``q8head``, paged decode attention ``attention``), and flash-attn's varlen kernel
on CUDA when installed (``flash``)."""
