#!/usr/bin/env bash
# Exit 0 when the local cluster is up and healthy (API server, pod runner, Prometheus, netns).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if cluster_healthy; then
  echo "cluster up: KUBECONFIG=$KUBECONFIG_OUT prometheus=$(cat "$STATE/prometheus-url")"
else
  echo "cluster not running"
  exit 1
fi
