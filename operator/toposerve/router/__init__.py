"""The LLM-aware router: routing strategies (pure) and the streaming proxy (placeholder)."""
