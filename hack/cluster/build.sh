#!/usr/bin/env bash
# Builds the local cluster's binaries from the Go module proxy into a versioned cache outside the
# repository (no Docker, no prebuilt downloads). Each binary already in the cache is skipped, so a
# warm run takes a second. Usage: hack/cluster/build.sh [name ...]   (default: all)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$HERE/versions.sh"

export GOFLAGS="${GOFLAGS:--trimpath}"
export CGO_ENABLED=0
mkdir -p "$CLUSTER_BIN"
# One build at a time per cache (two checkouts, or make and a hand run, share it).
exec 9>"$CLUSTER_BIN/.build.lock"
flock 9
STAMP=$(date +%s)

log() { printf '[cluster-bin %4ss] %s\n' "$(($(date +%s) - STAMP))" "$*"; }

# Version stamps so `kubectl version` and the API server report the pinned release, not v0.0.0.
k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local flags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "-s -w$flags"
}

# build NAME DIR PKG [LDFLAGS]: go build PKG inside module DIR (a go.mod under gomod/) into the cache.
build() {
  local name=$1 dir=$2 pkg=$3 ldflags=${4:--s -w}
  if [[ -x "$CLUSTER_BIN/$name" ]]; then
    log "$name: already built"
    return
  fi
  log "$name: building $pkg"
  local t0
  t0=$(date +%s)
  if ! (cd "$dir" && go build -ldflags "$ldflags" -o "$CLUSTER_BIN/$name.tmp" "$pkg"); then
    rm -f "$CLUSTER_BIN/$name.tmp"
    log "$name: BUILD FAILED"
    return 1
  fi
  mv "$CLUSTER_BIN/$name.tmp" "$CLUSTER_BIN/$name"
  log "$name: built in $(($(date +%s) - t0))s"
}

# install NAME PKG@VERSION [LDFLAGS]: modules without replace directives build with `go install`.
install() {
  local name=$1 target=$2 ldflags=${3:--s -w}
  if [[ -x "$CLUSTER_BIN/$name" ]]; then
    log "$name: already built"
    return
  fi
  log "$name: building $target"
  local t0 tmp
  t0=$(date +%s)
  tmp=$(mktemp -d)
  if ! GOBIN="$tmp" go install -ldflags "$ldflags" "$target"; then
    rm -rf "$tmp"
    log "$name: BUILD FAILED"
    return 1
  fi
  mv "$tmp"/* "$CLUSTER_BIN/$name"
  rmdir "$tmp"
  log "$name: built in $(($(date +%s) - t0))s"
}

WANT=("$@")
sel() { [[ ${#WANT[@]} -eq 0 ]] || [[ " ${WANT[*]} " == *" $1 "* ]]; }

log "cache: $CLUSTER_BIN ($(go version))"
sel kwokctl && install kwokctl "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
sel kwok && install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
sel etcd && build etcd "$HERE/gomod/etcd" go.etcd.io/etcd/server/v3
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  sel "$c" && build "$c" "$HERE/gomod/k8s" "k8s.io/kubernetes/cmd/$c" "$(k8s_ldflags)"
done
sel helm && install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
if sel lws-controller; then
  # Optional: the LeaderWorkerSet controller. A failure is reported, not fatal.
  build lws-controller "$HERE/gomod/lws" sigs.k8s.io/lws/cmd || log "lws-controller is optional: continuing"
fi
log "done: $(cd "$CLUSTER_BIN" && echo *)"
