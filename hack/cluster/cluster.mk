# Local Kubernetes cluster (real control plane + kwok GPU fleet + local pod runner + Prometheus).
# Included by the top-level Makefile, which defines PY and BIN. See docs/local-cluster.md.
CLUSTER_SCRIPTS := hack/cluster
CLUSTER_ENV = PY=$(abspath $(PY))

.PHONY: cluster-bin cluster-deps cluster-up cluster-down cluster-status test-cluster keda-bin test-keda

## Build kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, kwokctl,
## helm (and the LeaderWorkerSet controller) into ~/.cache/toposerve/k8s-<version>/bin.
cluster-bin:
	@bash $(CLUSTER_SCRIPTS)/build.sh

## Debian packages (iproute2, prometheus) when missing, then cluster-bin.
cluster-deps:
	@bash $(CLUSTER_SCRIPTS)/deps.sh

## Start the cluster (a fast no-op when it runs); CLUSTER_PROFILE=gpu|nogpu.
cluster-up: venv cluster-deps
	@$(CLUSTER_ENV) bash $(CLUSTER_SCRIPTS)/up.sh

## Stop the cluster and remove everything it made.
cluster-down:
	@$(CLUSTER_ENV) bash $(CLUSTER_SCRIPTS)/down.sh

cluster-status:
	@$(CLUSTER_ENV) bash $(CLUSTER_SCRIPTS)/status.sh

## The cluster tests (pytest -m cluster tests/cluster); TOPOSERVE_SKIP_CLUSTER=1 skips them loudly.
test-cluster: venv
	@$(CLUSTER_ENV) bash $(CLUSTER_SCRIPTS)/test.sh

## KEDA's operator and metrics adapter from the Go module (hack/keda/build.sh; docs/development.md).
keda-bin:
	@bash hack/keda/build.sh

## keda mode end to end with the real KEDA (tests/cluster/test_keda.py): builds KEDA, starts the
## cluster and KEDA (hack/keda/up.sh, from the test's fixture) and runs the `keda` tests.
test-keda: venv cluster-deps keda-bin
	@$(CLUSTER_ENV) PYTEST_MARK=keda bash $(CLUSTER_SCRIPTS)/test.sh

## hpa mode end to end with the real prometheus-adapter (tests/cluster/test_hpa_adapter.py): builds
## it from the Go module (hack/prometheus-adapter/build.sh), starts the cluster and the adapter
## (hack/prometheus-adapter/up.sh, from the test's fixture, which stops it again) and runs the
## `hpa_adapter` tests.
.PHONY: test-hpa
test-hpa: venv cluster-deps
	@bash hack/prometheus-adapter/build.sh
	@$(CLUSTER_ENV) PYTEST_MARK=hpa_adapter bash $(CLUSTER_SCRIPTS)/test.sh
