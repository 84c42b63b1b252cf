"""A CPU-only mock of the vLLM OpenAI server, for clusters without GPUs (placeholder)."""
