#!/usr/bin/env bash
# Builds GIE's reference lightweight Endpoint Picker (`cmd/lwepp` of the Go module
# sigs.k8s.io/gateway-api-inference-extension) from the Go module proxy into a versioned cache
# outside the repository, for the side-by-side ext_proc test (tests/cluster/test_epp_lwepp.py).
# Idempotent: a binary already in the cache is kept (a warm run takes a second). Prints the path.
# Usage: hack/gie/build-lwepp.sh    (GIE_VERSION=v1.6.2 by default)
set -euo pipefail
GIE_VERSION=${GIE_VERSION:-v1.6.2}
BIN=${GIE_BIN:-$HOME/.cache/toposerve/gie-$GIE_VERSION/bin}
mkdir -p "$BIN"
exec 9>"$BIN/.build.lock"  # one build at a time per cache
flock 9
if [[ -x "$BIN/lwepp" ]]; then
  echo "$BIN/lwepp"
  exit 0
fi
t0=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The module has no replace directives, so `go install pkg@version` builds it as released.
if ! CGO_ENABLED=0 GOFLAGS=-trimpath GOBIN="$tmp" \
  go install -ldflags "-s -w" "sigs.k8s.io/gateway-api-inference-extension/cmd/lwepp@$GIE_VERSION" >&2; then
  echo "lwepp $GIE_VERSION: BUILD FAILED" >&2
  exit 1
fi
mv "$tmp/lwepp" "$BIN/lwepp"
echo "lwepp $GIE_VERSION: built in $(($(date +%s) - t0))s" >&2
echo "$BIN/lwepp"
