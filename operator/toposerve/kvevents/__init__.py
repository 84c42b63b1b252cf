"""vLLM's KV-cache events: the block hashes engines compute and the wire format they publish."""
