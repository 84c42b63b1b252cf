"""Local development cluster tooling: the simulated GPU fleet and the local pod runner.

Only the cluster scripts (hack/cluster) and the cluster tests import this package; it is not part
of the operator's runtime.
"""
