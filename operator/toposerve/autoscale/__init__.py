"""KV-cache autoscaling: a pure decision (``decision``, ``schedule``), the metrics sources and the
operator's loop around them (I/O shells)."""
