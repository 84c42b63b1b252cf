#!/usr/bin/env bash
# `make image`: builds the toposerve image without a Docker engine, from Debian's packages.
#   1. wheels: every pinned dependency (hash-checked) and toposerve, by the host's pip;
#   2. root filesystem: mmdebstrap (Debian bookworm, minbase + python3), then hack/image/install.sh
#      in a chroot, exactly what the Dockerfile runs;
#   3. OCI image: umoci adds the root filesystem as one layer and sets user, entrypoint and env;
#      skopeo writes a docker-archive for `docker load` / `kind load image-archive`.
# Output in build/image/: rootfs/ (the test runs it), oci/ (layout), toposerve-<version>.tar.
# Needs root (chroot, device nodes) and: apt-get install mmdebstrap umoci skopeo (done here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${IMAGE_OUT:-$ROOT/build/image}
VERSION=$("$PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")
REPO=${IMAGE_REPOSITORY:-ghcr.io/toposerve/toposerve}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Reproducible timestamps: the commit's time, else a fixed one.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 1767225600)}
export SOURCE_DATE_EPOCH
log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
T0=$(date +%s)

[[ $(id -u) -eq 0 ]] || { echo "build.sh: must run as root (mmdebstrap chroot)" >&2; exit 1; }
missing=()
for tool in mmdebstrap umoci skopeo; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

rm -rf "$OUT"
mkdir -p "$OUT/wheels"
log "wheels (pinned, hash-checked) -> $OUT/wheels"
cp "$ROOT/hack/image/requirements.txt" "$OUT/wheels/requirements.txt"
"$PY" -m pip wheel -q --no-cache-dir --require-hashes --only-binary=:all: \
  -r "$OUT/wheels/requirements.txt" -w "$OUT/wheels"
"$PY" -m pip wheel -q --no-cache-dir --no-deps -w "$OUT/wheels" "$ROOT"
cp "$ROOT/hack/image/install.sh" "$OUT/wheels/install.sh"
T1=$(date +%s)

log "root filesystem: mmdebstrap $SUITE minbase + python3 -> $OUT/rootfs"
mmdebstrap --quiet --variant=minbase --mode=root --format=directory \
  --include=python3,python3-venv,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='mkdir -p "$1/tmp/wheels"' \
  --customize-hook="copy-in $OUT/wheels/. /tmp/wheels" \
  --customize-hook='chroot "$1" sh /tmp/wheels/install.sh /tmp/wheels' \
  --customize-hook='rm -rf "$1/tmp/wheels" "$1"/var/cache/ldconfig/aux-cache' \
  "$SUITE" "$OUT/rootfs" "$MIRROR"
T2=$(date +%s)

log "OCI image $REPO:$VERSION -> $OUT/oci"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --numeric-owner --xattrs -C "$OUT/rootfs" -cf "$OUT/rootfs.tar" .
umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:$VERSION"
umoci raw add-layer --image "$OUT/oci:$VERSION" "$OUT/rootfs.tar"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
umoci config --image "$OUT/oci:$VERSION" --created="$created" --os=linux --architecture=amd64 \
  --config.user=65532:65532 --config.workingdir=/ \
  --config.entrypoint=toposerve --config.cmd=--help \
  --config.env='PATH=/opt/toposerve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --config.env=PYTHONDONTWRITEBYTECODE=1 --config.env=PYTHONUNBUFFERED=1 \
  --config.label="org.opencontainers.image.version=$VERSION" \
  --config.label="org.opencontainers.image.title=toposerve"
umoci gc --layout "$OUT/oci"
rm -f "$OUT/rootfs.tar"
skopeo --insecure-policy copy --quiet "oci:$OUT/oci:$VERSION" "docker-archive:$OUT/toposerve-$VERSION.tar:$REPO:$VERSION"
T3=$(date +%s)
size=$(du -sh "$OUT/rootfs" | cut -f1)
log "done in $((T3 - T0))s (wheels $((T1 - T0))s, rootfs $((T2 - T1))s, OCI $((T3 - T2))s); rootfs $size; $(du -h "$OUT/toposerve-$VERSION.tar" | cut -f1) archive"
