"""The GPU health agent: NVML readings -> verdict (pure) -> metrics, Node condition and taint."""
