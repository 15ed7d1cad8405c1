"""The batched inference engine: token ids and tensors in, token ids out. Knows nothing of HTTP or chat."""
