#!/usr/bin/env bash
# Runs KEDA v2.21.0 (operator + metrics adapter, built by hack/keda/build.sh) against the running
# local cluster, the way the LeaderWorkerSet controller runs there: as host processes with the
# cluster's admin kubeconfig, since the pod runner only runs the project's own image.
#
# What is real: KEDA's CRDs (from the same module), its operator (ScaledObject controller, which
# creates and owns the `keda-hpa-<name>` HPA and does 0 <-> 1 activation itself), its cert rotation
# (it writes the CA the APIService trusts), its gRPC metrics service, and its metrics adapter
# registered as the aggregated API `v1beta1.external.metrics.k8s.io`, which the API server's
# aggregator calls and kube-controller-manager's HPA controller reads. What is local: the
# adapter's Service has no selector but an Endpoints object naming the host end of the pod
# network ($HOST_ADDR), because the API server runs with --enable-aggregator-routing and there is
# no kube-proxy (docs/local-cluster.md). The aggregator authenticates to the adapter with kwokctl's
# proxy client certificate (the admin one), which the adapter accepts through delegated
# authentication against the cluster's client CA.
# Ports: adapter $HOST_ADDR:9445, operator gRPC 127.0.0.1:9666, metrics/probes 127.0.0.1:18180-18182
# (18081 is the LWS controller's probe).
# Usage: hack/keda/up.sh   (after hack/cluster/up.sh; a running KEDA is left as it is)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/common.sh"
KEDA_DIR=$STATE/keda
ADAPTER_PORT=${TOPOSERVE_KEDA_ADAPTER_PORT:-9445}
GRPC_ADDR=127.0.0.1:${TOPOSERVE_KEDA_GRPC_PORT:-9666}

cluster_healthy || { echo "keda/up.sh: the local cluster is not running (make cluster-up)" >&2; exit 1; }
if pid_alive "$KEDA_DIR/operator.pid" && pid_alive "$KEDA_DIR/adapter.pid" &&
  [[ $(kc get apiservice v1beta1.external.metrics.k8s.io \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null) == True ]]; then
  log "KEDA $KEDA_VERSION already running"
  exit 0
fi
"$(dirname "${BASH_SOURCE[0]}")/build.sh"
stop_pidfile "$KEDA_DIR/adapter.pid" 10
stop_pidfile "$KEDA_DIR/operator.pid" 10
mkdir -p "$KEDA_DIR/certs"
T0=$(date +%s)

log "KEDA $KEDA_VERSION: CRDs, namespace keda, adapter Service -> $HOST_ADDR:$ADAPTER_PORT, APIService"
kc apply --server-side --force-conflicts -f "$KEDA_BIN/../crds/" >/dev/null
for crd in scaledobjects.keda.sh scaledjobs.keda.sh triggerauthentications.keda.sh \
  clustertriggerauthentications.keda.sh; do
  for _ in $(seq 120); do
    [[ $(kc get crd "$crd" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null) == True ]] &&
      break
    sleep 0.5
  done
done
kc apply --server-side --force-conflicts -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: keda}
---
apiVersion: v1
kind: Service
metadata: {name: keda-metrics-apiserver, namespace: keda, labels: {app: keda-metrics-apiserver}}
spec:
  ports: [{name: https, port: 443, targetPort: $ADAPTER_PORT, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: keda-metrics-apiserver, namespace: keda}
subsets:
- addresses: [{ip: "$HOST_ADDR"}]
  ports: [{name: https, port: $ADAPTER_PORT, protocol: TCP}]
---
# As config/metrics-server/api_service.yaml of the module; KEDA's cert rotation fills caBundle.
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.external.metrics.k8s.io, labels: {app.kubernetes.io/part-of: keda-operator}}
spec:
  service: {name: keda-metrics-apiserver, namespace: keda, port: 443}
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
YAML

# The operator: as config/manager/manager.yaml (cert rotation on), on loopback ports, no webhooks.
# KEDA's cert rotation (open-policy-agent/cert-controller) writes the certificates into the Secret
# keda/kedaorg-certs, waits for the kubelet to mount them at --cert-dir, and exits once after
# generating them so the pod restarts with the mounted files (RestartOnSecretRefresh). Here this
# script is the kubelet: it writes the Secret's keys into the directory and starts the operator
# again when that first run has exited.
start_operator() {
  KEDA_CLUSTER_OBJECT_NAMESPACE=keda POD_NAMESPACE=keda WATCH_NAMESPACE="" KUBECONFIG=$KUBECONFIG_OUT \
    nohup "$KEDA_BIN/keda" --leader-elect=false --zap-log-level=info --zap-encoder=console \
    --enable-cert-rotation=true --cert-dir="$KEDA_DIR/certs" --enable-webhook-patching=false \
    --metrics-bind-address=127.0.0.1:18180 --health-probe-bind-address=127.0.0.1:18181 \
    --metrics-service-bind-address="$GRPC_ADDR" --ca-dir="$KEDA_DIR/ca" \
    >>"$KEDA_DIR/operator.log" 2>&1 </dev/null &
  echo $! >"$KEDA_DIR/operator.pid"
}
mount_certs() {
  local key data
  for key in ca.crt tls.crt tls.key; do
    data=$(kc -n keda get secret kedaorg-certs -o "jsonpath={.data.${key//./\\.}}" 2>/dev/null) || return 1
    [[ -n $data ]] || return 1
    base64 -d <<<"$data" >"$KEDA_DIR/certs/$key.tmp" && mv "$KEDA_DIR/certs/$key.tmp" "$KEDA_DIR/certs/$key"
  done
}
log "operator (gRPC metrics service on $GRPC_ADDR)"
rm -f "$KEDA_DIR/certs/"* "$KEDA_DIR/operator.log"
start_operator
for _ in $(seq 240); do
  mount_certs && break
  pid_alive "$KEDA_DIR/operator.pid" || start_operator
  sleep 0.5
done
[[ -s "$KEDA_DIR/certs/tls.crt" ]] ||
  { tail -n 30 "$KEDA_DIR/operator.log" >&2; echo "keda/up.sh: the operator wrote no certificates into keda/kedaorg-certs" >&2; exit 1; }
# The first run exits after generating the certificates; a run that finds them stays.
for _ in $(seq 20); do pid_alive "$KEDA_DIR/operator.pid" || break; sleep 0.5; done
pid_alive "$KEDA_DIR/operator.pid" || start_operator
for _ in $(seq 120); do
  curl -fsS -o /dev/null http://127.0.0.1:18181/readyz 2>/dev/null && break
  pid_alive "$KEDA_DIR/operator.pid" || break
  sleep 0.5
done
curl -fsS -o /dev/null http://127.0.0.1:18181/readyz ||
  { tail -n 30 "$KEDA_DIR/operator.log" >&2; echo "keda/up.sh: the operator is not ready" >&2; exit 1; }

# The adapter: as config/metrics-server/deployment.yaml, but bound to the pod network's host end
# and reaching the operator's gRPC service on loopback under its in-cluster name.
log "metrics adapter on $HOST_ADDR:$ADAPTER_PORT"
KEDA_CLUSTER_OBJECT_NAMESPACE=keda POD_NAMESPACE=keda WATCH_NAMESPACE="" KUBECONFIG=$KUBECONFIG_OUT \
  nohup "$KEDA_BIN/keda-adapter" --secure-port="$ADAPTER_PORT" --bind-address="$HOST_ADDR" \
  --cert-dir="$KEDA_DIR/certs" --tls-cert-file="$KEDA_DIR/certs/tls.crt" \
  --tls-private-key-file="$KEDA_DIR/certs/tls.key" \
  --authentication-kubeconfig="$KUBECONFIG_OUT" --authorization-kubeconfig="$KUBECONFIG_OUT" \
  --lister-kubeconfig="$KUBECONFIG_OUT" --kubeconfig="$KUBECONFIG_OUT" --metrics-service-address="$GRPC_ADDR" \
  --metrics-service-grpc-authority=keda-operator.keda.svc.cluster.local \
  --port=18182 --zap-log-level=info \
  >"$KEDA_DIR/adapter.log" 2>&1 </dev/null &
echo $! >"$KEDA_DIR/adapter.pid"
for _ in $(seq 240); do
  [[ $(kc get apiservice v1beta1.external.metrics.k8s.io \
    -o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null) == True ]] && break
  pid_alive "$KEDA_DIR/adapter.pid" || break
  sleep 0.5
done
if [[ $(kc get apiservice v1beta1.external.metrics.k8s.io \
  -o jsonpath='{.status.conditions[?(@.type=="Available")].status}') != True ]]; then
  tail -n 30 "$KEDA_DIR/adapter.log" >&2
  kc get apiservice v1beta1.external.metrics.k8s.io -o jsonpath='{.status.conditions}' >&2
  echo "keda/up.sh: the external metrics APIService is not Available" >&2
  exit 1
fi
log "KEDA $KEDA_VERSION up in $(($(date +%s) - T0))s (logs: $KEDA_DIR/*.log)"
