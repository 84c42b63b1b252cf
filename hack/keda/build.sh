#!/usr/bin/env bash
# Builds KEDA's operator and metrics adapter from the Go module proxy's copy of
# github.com/kedacore/keda/v2 into the cache beside the Kubernetes binaries (no images, no
# prebuilt downloads). KEDA's go.mod has `replace` directives, so `go install pkg@version` refuses
# it: the module is downloaded, copied to a writable directory and built there, with the
# ldflags of KEDA's own Makefile (`make build`). Built binaries are skipped, so a warm run takes a
# second. Usage: hack/keda/build.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../cluster/versions.sh
source "$HERE/../cluster/versions.sh"

export GOFLAGS="${GOFLAGS:--trimpath}"
export CGO_ENABLED=0
mkdir -p "$KEDA_BIN"
exec 9>"$KEDA_BIN/.build.lock"
flock 9
T0=$(date +%s)
log() { printf '[keda-bin %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

if [[ -x "$KEDA_BIN/keda" && -x "$KEDA_BIN/keda-adapter" ]]; then
  log "keda $KEDA_VERSION: already built in $KEDA_BIN"
  exit 0
fi
mod=$(cd / && go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" |
  sed -nE 's/^\s*"Dir": "(.*)",?$/\1/p')
src="$KEDA_BIN/../src"
rm -rf "$src"
cp -r "$mod" "$src"
chmod -R u+w "$src"
ldflags="-s -w -X=github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION"
ldflags+=" -X=github.com/kedacore/keda/v2/version.GitCommit=module-proxy"
for pair in keda:./cmd/operator keda-adapter:./cmd/adapter; do
  name=${pair%%:*} pkg=${pair#*:}
  [[ -x "$KEDA_BIN/$name" ]] && { log "$name: already built"; continue; }
  t=$(date +%s)
  log "$name: building $pkg"
  (cd "$src" && go build -ldflags "$ldflags" -o "$KEDA_BIN/$name.tmp" "$pkg") ||
    { rm -f "$KEDA_BIN/$name.tmp"; log "$name: BUILD FAILED"; exit 1; }
  mv "$KEDA_BIN/$name.tmp" "$KEDA_BIN/$name"
  log "$name: built in $(($(date +%s) - t))s"
done
# The CRDs the operator serves, from the same module (kept beside the binaries).
mkdir -p "$KEDA_BIN/../crds"
cp "$src"/config/crd/bases/*.yaml "$KEDA_BIN/../crds/"
log "keda $KEDA_VERSION built in $(($(date +%s) - T0))s into $KEDA_BIN"
