#!/usr/bin/env bash
# Builds prometheus-adapter (the custom metrics API server the hpa mode's HPA reads,
# sigs.k8s.io/prometheus-adapter) from the Go module proxy's copy into the cache beside the
# Kubernetes binaries (no images, no prebuilt downloads): the package its Makefile's `adapter`
# target builds (./cmd/adapter, CGO_ENABLED=0). The Go module cache is shared with the other builds; a built
# binary is skipped, so a warm run takes well under a second. Usage: hack/prometheus-adapter/build.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../cluster/versions.sh
source "$HERE/../cluster/versions.sh"
# shellcheck source=versions.sh
source "$HERE/versions.sh"

export GOFLAGS="${GOFLAGS:--trimpath}"
export CGO_ENABLED=0
mkdir -p "$PROMETHEUS_ADAPTER_BIN"
exec 9>"$PROMETHEUS_ADAPTER_BIN/.build.lock"
flock 9
T0=$(date +%s)
log() { printf '[prometheus-adapter-bin %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

if [[ -x "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter" ]]; then
  log "prometheus-adapter $PROMETHEUS_ADAPTER_VERSION: already built in $PROMETHEUS_ADAPTER_BIN"
  exit 0
fi
# `go install <module>/cmd/adapter@<version>` would also ask the proxy for the module's version
# list (for deprecation notices), which the proxy here refuses; so, as hack/keda/build.sh does, the
# module is downloaded, copied to a writable directory and built there with its own go.sum.
mod=$(cd / && go mod download -json "sigs.k8s.io/prometheus-adapter@$PROMETHEUS_ADAPTER_VERSION" |
  sed -nE 's/^\s*"Dir": "(.*)",?$/\1/p')
[[ -n $mod ]] || { log "go mod download sigs.k8s.io/prometheus-adapter@$PROMETHEUS_ADAPTER_VERSION FAILED"; exit 1; }
src="$PROMETHEUS_ADAPTER_BIN/../src"
rm -rf "$src"
cp -r "$mod" "$src"
chmod -R u+w "$src"
log "building sigs.k8s.io/prometheus-adapter/cmd/adapter@$PROMETHEUS_ADAPTER_VERSION"
(cd "$src" && go build -ldflags "-s -w" -o "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter.tmp" ./cmd/adapter) ||
  { rm -f "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter.tmp"; log "BUILD FAILED"; exit 1; }
mv "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter.tmp" "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter"
log "prometheus-adapter $PROMETHEUS_ADAPTER_VERSION built in $(($(date +%s) - T0))s into $PROMETHEUS_ADAPTER_BIN"
