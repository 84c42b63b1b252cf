# Local cluster targets (owned by the local-cluster work; see hack/cluster/).
.PHONY: cluster-bin cluster-up cluster-down test-cluster

cluster-bin:
	@echo "cluster-bin: not built yet"

cluster-up:
	@echo "cluster-up: not built yet"

cluster-down:
	@echo "cluster-down: not built yet"

test-cluster:
	@echo "test-cluster: no cluster tests yet"
