"""The LLM-aware router: pure routing strategies, a streaming proxy, and EndpointSlice discovery.

Layers: `strategies` (pure decisions and accounting) <- `endpoints` (pure endpoint-set rules)
<- `proxy` (aiohttp shell) and `discovery` (Kubernetes watch shell) <- `cli`.
"""
