#!/usr/bin/env bash
# Stops the prometheus-adapter that hack/prometheus-adapter/up.sh started and removes its
# APIService, Service and namespace, so the cluster has no custom metrics API again (the cluster
# tests that check hpa mode without an adapter, test_autoscale.py, expect ScalingActive=False).
# Usage: hack/prometheus-adapter/down.sh   (a no-op when nothing runs)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/common.sh"
PA_DIR=$STATE/prometheus-adapter
if [[ -f "$KUBECONFIG_OUT" ]] && kc get --raw /readyz >/dev/null 2>&1; then
  kc delete apiservice v1beta1.custom.metrics.k8s.io --ignore-not-found >/dev/null
  kc delete namespace prometheus-adapter --ignore-not-found --wait=false >/dev/null
fi
stop_pidfile "$PA_DIR/adapter.pid" 10
log "prometheus-adapter stopped"
