#!/usr/bin/env bash
# Runs prometheus-adapter v0.12.0 (built by hack/prometheus-adapter/build.sh) against the running
# local cluster and its Prometheus, the way hack/keda/up.sh runs KEDA's adapter: as a host process
# with the cluster's admin kubeconfig, since the pod runner only runs the project's own image.
#
# What is real: the adapter, its rules (hack/prometheus-adapter/config.yaml: vLLM's `vllm:` series
# served as the Pods metrics toposerve's hpa mode names), its queries to the cluster's Prometheus,
# and its registration as the aggregated API `v1beta1.custom.metrics.k8s.io`, which the API
# server's aggregator calls and kube-controller-manager's HPA controller reads. What is local: the
# adapter's Service has no selector but an Endpoints object naming the host end of the pod network
# ($HOST_ADDR), because the API server runs with --enable-aggregator-routing and there is no
# kube-proxy (docs/local-cluster.md); its serving certificate is made here with openssl for the
# Service's name (cert-manager or a Secret would give it in a cluster) and the APIService trusts it
# through caBundle, not insecureSkipTLSVerify. The aggregator authenticates with kwokctl's proxy
# client certificate, which the adapter accepts through delegated authentication against the
# cluster's requestheader CA (kube-system/extension-apiserver-authentication).
# Port: $HOST_ADDR:${TOPOSERVE_PROMETHEUS_ADAPTER_PORT:-9446} (KEDA's adapter is on 9445).
# Usage: hack/prometheus-adapter/up.sh   (after hack/cluster/up.sh; a running adapter is left as it
# is); hack/prometheus-adapter/down.sh stops it and removes the APIService again.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/common.sh"
# shellcheck source=versions.sh
source "$(dirname "${BASH_SOURCE[0]}")/versions.sh"
PA_DIR=$STATE/prometheus-adapter
PA_NS=prometheus-adapter
PA_PORT=${TOPOSERVE_PROMETHEUS_ADAPTER_PORT:-9446}
APISERVICE=v1beta1.custom.metrics.k8s.io
# The rules; another file (TOPOSERVE_PROMETHEUS_ADAPTER_CONFIG) for other metric names.
PA_CONFIG=${TOPOSERVE_PROMETHEUS_ADAPTER_CONFIG:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/config.yaml}

available() {
  [[ $(kc get apiservice "$APISERVICE" \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null) == True ]]
}

cluster_healthy || { echo "prometheus-adapter/up.sh: the local cluster is not running (make cluster-up)" >&2; exit 1; }
if pid_alive "$PA_DIR/adapter.pid" && available; then
  log "prometheus-adapter $PROMETHEUS_ADAPTER_VERSION already running"
  exit 0
fi
"$(dirname "${BASH_SOURCE[0]}")/build.sh"
stop_pidfile "$PA_DIR/adapter.pid" 10
mkdir -p "$PA_DIR/certs"
T0=$(date +%s)

log "prometheus-adapter: serving certificate for prometheus-adapter.$PA_NS.svc"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=prometheus-adapter.$PA_NS.svc" \
  -addext "subjectAltName=DNS:prometheus-adapter.$PA_NS.svc,DNS:prometheus-adapter.$PA_NS.svc.cluster.local,IP:$HOST_ADDR" \
  -keyout "$PA_DIR/certs/tls.key" -out "$PA_DIR/certs/tls.crt" 2>/dev/null
ca=$(base64 -w0 <"$PA_DIR/certs/tls.crt")

log "namespace $PA_NS, Service -> $HOST_ADDR:$PA_PORT, APIService $APISERVICE"
# As deploy/manifests/{service,api-service}.yaml of the module, for the custom metrics API (the
# module's own manifest registers v1beta1.metrics.k8s.io, the resource metrics API, instead).
kc apply --server-side --force-conflicts -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $PA_NS}
---
apiVersion: v1
kind: Service
metadata: {name: prometheus-adapter, namespace: $PA_NS, labels: {app.kubernetes.io/name: prometheus-adapter}}
spec:
  ports: [{name: https, port: 443, targetPort: $PA_PORT, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: prometheus-adapter, namespace: $PA_NS}
subsets:
- addresses: [{ip: "$HOST_ADDR"}]
  ports: [{name: https, port: $PA_PORT, protocol: TCP}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $APISERVICE
  labels: {app.kubernetes.io/name: prometheus-adapter, app.kubernetes.io/version: "${PROMETHEUS_ADAPTER_VERSION#v}"}
spec:
  service: {name: prometheus-adapter, namespace: $PA_NS, port: 443}
  group: custom.metrics.k8s.io
  version: v1beta1
  caBundle: $ca
  groupPriorityMinimum: 100
  versionPriority: 100
YAML

# As deploy/manifests/deployment.yaml (--config, --prometheus-url, --secure-port, the relist
# interval shortened from 1m so that series of engines started a moment ago are served soon),
# bound to the pod network's host end, with the cluster's kubeconfig for delegated authn/authz and
# for its listers (in a pod: in-cluster config).
log "adapter on $HOST_ADDR:$PA_PORT, Prometheus http://127.0.0.1:$PROM_PORT"
KUBECONFIG=$KUBECONFIG_OUT nohup "$PROMETHEUS_ADAPTER_BIN/prometheus-adapter" \
  --config="$PA_CONFIG" \
  --prometheus-url="http://127.0.0.1:$PROM_PORT/" \
  --metrics-relist-interval=10s \
  --secure-port="$PA_PORT" --bind-address="$HOST_ADDR" --cert-dir="$PA_DIR/certs" \
  --tls-cert-file="$PA_DIR/certs/tls.crt" --tls-private-key-file="$PA_DIR/certs/tls.key" \
  --authentication-kubeconfig="$KUBECONFIG_OUT" --authorization-kubeconfig="$KUBECONFIG_OUT" \
  --lister-kubeconfig="$KUBECONFIG_OUT" --v=2 \
  >"$PA_DIR/adapter.log" 2>&1 </dev/null &
echo $! >"$PA_DIR/adapter.pid"
for _ in $(seq 240); do
  available && break
  pid_alive "$PA_DIR/adapter.pid" || break
  sleep 0.5
done
if ! available; then
  tail -n 30 "$PA_DIR/adapter.log" >&2
  kc get apiservice "$APISERVICE" -o jsonpath='{.status.conditions}' >&2
  echo "prometheus-adapter/up.sh: the custom metrics APIService is not Available" >&2
  exit 1
fi
log "prometheus-adapter $PROMETHEUS_ADAPTER_VERSION up in $(($(date +%s) - T0))s (log: $PA_DIR/adapter.log)"
