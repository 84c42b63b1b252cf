"""toposerve: a Kubernetes operator for topology-aware LLM serving on heterogeneous GPU clusters."""

__version__ = "0.1.0"

API_GROUP = "toposerve.io"
API_VERSION = "v1alpha1"
