#!/usr/bin/env bash
# Installs what the local cluster needs from Debian (iproute2, prometheus) when it is missing and
# builds the binaries into the cache (skipping what is built). Safe to run again.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v prometheus >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
  echo "[deps] apt-get install ${missing[*]}"
  [[ $(id -u) -eq 0 ]] || { echo "[deps] need root to install ${missing[*]}" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v go >/dev/null || { echo "[deps] Go is needed to build the cluster binaries" >&2; exit 1; }
"$HERE/build.sh"
