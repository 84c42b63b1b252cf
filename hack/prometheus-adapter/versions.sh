# prometheus-adapter (issue 25: hpa mode end to end, `make test-hpa`); sourced by the scripts beside
# this file after hack/cluster/versions.sh. v0.12.0 is the newest release the Go module proxy
# serves here (`go mod download sigs.k8s.io/prometheus-adapter@v0.12.0`).
# shellcheck disable=SC2034  # used by the scripts that source this file
PROMETHEUS_ADAPTER_VERSION=v0.12.0
PROMETHEUS_ADAPTER_BIN=${PROMETHEUS_ADAPTER_BIN:-$TOPOSERVE_CACHE/prometheus-adapter-$PROMETHEUS_ADAPTER_VERSION/bin}
