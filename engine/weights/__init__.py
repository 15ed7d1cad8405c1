"""Checkpoint discovery and weight loading (safetensors, GGUF, hub ids)."""
