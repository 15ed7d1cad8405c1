"""Native CPU kernels, built for the host on first use (``native``): quantized matmuls (``q4q8``, ``q8head``)
and paged decode attention (``attention``)."""
