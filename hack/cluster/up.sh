#!/usr/bin/env bash
# Starts the local cluster: the pod network namespace, a real control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) with kwok nodes via kwokctl's binary runtime, the
# simulated GPU fleet, the local pod runner and Prometheus. A running cluster is left as it is.
# Usage: hack/cluster/up.sh   (CLUSTER_PROFILE=gpu|nogpu)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
T0=$(date +%s)

if cluster_healthy; then
  log "cluster already running ($(kc get nodes --no-headers | wc -l) nodes)"
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "up.sh: must run as root (network namespaces)" >&2; exit 1; }
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok kwokctl; do
  [[ -x "$CLUSTER_BIN/$b" ]] || { echo "up.sh: $CLUSTER_BIN/$b missing: run make cluster-bin" >&2; exit 1; }
done
command -v prometheus >/dev/null || { echo "up.sh: prometheus missing: run hack/cluster/deps.sh" >&2; exit 1; }

check_owner
# A half-started or stale cluster (say, from a killed run) is removed first.
if [[ -d "$STATE" ]] || ip netns list | grep -qw "$NETNS"; then
  log "removing a stale cluster first"
  "$HERE/down.sh"
fi
mkdir -p "$STATE"

mkdir -p "$(dirname "$OWNER_FILE")"
echo "$STATE" >"$OWNER_FILE"
log "pod network: netns $NETNS, $POD_NETWORK via $VETH_HOST ($HOST_ADDR)"
ip netns add "$NETNS"
ip link add "$VETH_HOST" type veth peer name "$VETH_NS" netns "$NETNS"
ip addr add "$HOST_ADDR/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
ip -n "$NETNS" addr add "$NS_ADDR/30" dev "$VETH_NS"
ip -n "$NETNS" link set "$VETH_NS" up
ip -n "$NETNS" link set lo up
# Only the pod network is routed into the namespace; the namespace has no default route, so pods
# reach nothing but the host end of the veth (the API server, Prometheus).
ip route add "$POD_NETWORK" via "$NS_ADDR" dev "$VETH_HOST"

log "control plane: kwokctl (binary runtime) with Kubernetes $K8S_VERSION from $CLUSTER_BIN"
mkdir -p "$KWOK_WORKDIR"
cat >"$STATE/kwokctl.yaml" <<YAML
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  kubeVersion: $K8S_VERSION
  kubeBinaryPrefix: $CLUSTER_BIN
  kubectlBinary: $CLUSTER_BIN/kubectl
  etcdBinary: $CLUSTER_BIN/etcd
  kwokControllerBinary: $CLUSTER_BIN/kwok
  cacheDir: $KWOK_WORKDIR/cache
  kubeApiserverCertSANs: ["$HOST_ADDR", "127.0.0.1"]
  # Every component (etcd on plain HTTP, the API server, controllers, kwok) listens on loopback
  # only; pods reach the API server at $HOST_ADDR through the pod runner's relay (--forward).
  bindAddress: 127.0.0.1
  kubeAuthorization: true
  kubeAdmission: true
  nodeLeaseDurationSeconds: 40
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - {key: service-cluster-ip-range, value: 10.96.0.0/16}
  # No kube-proxy: webhooks and aggregated APIs are called on their endpoints, not ClusterIPs.
  - {key: enable-aggregator-routing, value: "true"}
  # The kubernetes Service's endpoint: where pods reach the API server (the relay).
  - {key: advertise-address, value: "$HOST_ADDR"}
---
YAML
cat "$HERE/stages.yaml" >>"$STATE/kwokctl.yaml"
"$CLUSTER_BIN/kwokctl" create cluster --name "$CLUSTER_NAME" --config "$STATE/kwokctl.yaml" \
  --kubeconfig "$STATE/kwokctl-kubeconfig" --wait 3m >"$STATE/kwokctl-create.log" 2>&1 || {
  cat "$STATE/kwokctl-create.log" >&2
  exit 1
}
cp "$KWOK_WORKDIR/clusters/$CLUSTER_NAME/kubeconfig.yaml" "$KUBECONFIG_OUT"
chmod 600 "$KUBECONFIG_OUT"
# Pods in the namespace reach the API server at the veth's host end.
sed -E "s#server: https?://[^:]+:#server: https://$HOST_ADDR:#" "$KUBECONFIG_OUT" >"$POD_KUBECONFIG"
chmod 600 "$POD_KUBECONFIG"
API_PORT=$(sed -nE 's#^ *server: https?://[^:]+:([0-9]+).*#\1#p' "$KUBECONFIG_OUT" | head -n1)

log "fleet: profile $CLUSTER_PROFILE from hack/cluster/fleet.yaml"
"$PY" -m toposerve.dev.fleet "$HERE/fleet.yaml" --profile "$CLUSTER_PROFILE" >"$STATE/nodes.yaml"
echo "$CLUSTER_PROFILE" >"$STATE/profile"
kc apply -f "$STATE/nodes.yaml" >/dev/null
kc wait --for=condition=Ready node --all --timeout=180s >/dev/null
kc apply -f "$HERE/runtimeclass.yaml" >/dev/null
for _ in $(seq 120); do kc get serviceaccount default >/dev/null 2>&1 && break; sleep 0.5; done

log "pod runner"
mkdir -p "$STATE/pods"
# It also relays $HOST_ADDR:$API_PORT to the API server on loopback and gives pods in-cluster
# config and ServiceAccount tokens (docs/local-cluster.md).
nohup "$PY" -m toposerve.dev.podrunner --kubeconfig "$KUBECONFIG_OUT" --netns "$NETNS" \
  --pod-kubeconfig "$POD_KUBECONFIG" --workdir "$STATE/pods" --bin-dir "$(dirname "$PY")" --sd-listen "$SD_LISTEN" \
  --forward "$HOST_ADDR:$API_PORT=127.0.0.1:$API_PORT" --nvml-dir "$STATE/nvml" \
  >"$STATE/podrunner.log" 2>&1 </dev/null &
echo $! >"$STATE/podrunner.pid"

if [[ -x "$CLUSTER_BIN/lws-controller" && "${TOPOSERVE_LWS:-1}" == 1 ]]; then
  log "LeaderWorkerSet $LWS_VERSION: CRD and webhooks, controller on the host ($HOST_ADDR:9443)"
  lws_dir=$(go env GOMODCACHE)/sigs.k8s.io/lws@$LWS_VERSION
  [[ -d "$lws_dir" ]] || (cd / && go mod download "sigs.k8s.io/lws@$LWS_VERSION")
  mkdir -p "$STATE/lws"
  kc kustomize "$lws_dir/config/default" 2>"$STATE/lws/kustomize.log" |
    "$PY" -m toposerve.dev.lws --host "$HOST_ADDR" --config-out "$STATE/lws/config.yaml" \
      --cert-dir "$STATE/lws/certs" >"$STATE/lws/manifests.yaml"
  kc apply --server-side -f "$STATE/lws/manifests.yaml" >/dev/null 2>"$STATE/lws/apply.log"
  # `kubectl wait` fails at once ("accessor error: <nil>") while the new CRD has no conditions yet.
  for _ in $(seq 120); do
    [[ $(kc get crd leaderworkersets.leaderworkerset.x-k8s.io \
      -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>/dev/null) == True ]] && break
    sleep 0.5
  done
  kc wait --for=condition=Established crd/leaderworkersets.leaderworkerset.x-k8s.io --timeout=60s >/dev/null
  nohup "$CLUSTER_BIN/lws-controller" --kubeconfig "$KUBECONFIG_OUT" --config "$STATE/lws/config.yaml" \
    >"$STATE/lws/controller.log" 2>&1 </dev/null &
  echo $! >"$STATE/lws.pid"
  # In a pod the kubelet mounts the webhook Secret the controller fills; here we copy it out.
  mkdir -p "$STATE/lws/certs"
  for _ in $(seq 120); do
    crt=$(kc -n lws-system get secret lws-webhook-server-cert -o jsonpath='{.data.tls\.crt}' 2>/dev/null || true)
    [[ -n "$crt" ]] && break
    sleep 0.5
  done
  for f in tls.crt tls.key ca.crt; do
    kc -n lws-system get secret lws-webhook-server-cert -o jsonpath="{.data.${f//./\\.}}" |
      base64 -d >"$STATE/lws/certs/$f"
  done
  for _ in $(seq 120); do
    curl -sk --noproxy '*' -o /dev/null "https://$HOST_ADDR:9443/" && break
    sleep 0.5
  done
  curl -sk --noproxy '*' -o /dev/null "https://$HOST_ADDR:9443/" ||
    { tail -n 20 "$STATE/lws/controller.log" >&2; echo "up.sh: LWS webhook not serving" >&2; exit 1; }
fi

log "prometheus on 127.0.0.1:$PROM_PORT"
"$HERE/prometheus.sh" >"$STATE/prometheus.yml"
mkdir -p "$STATE/prometheus"
nohup prometheus --config.file="$STATE/prometheus.yml" --storage.tsdb.path="$STATE/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=2h \
  >"$STATE/prometheus.log" 2>&1 </dev/null &
echo $! >"$STATE/prometheus.pid"
echo "http://127.0.0.1:$PROM_PORT" >"$STATE/prometheus-url"
for _ in $(seq 120); do
  curl -sf --noproxy '*' "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null && break
  sleep 0.5
done

pid_alive "$STATE/podrunner.pid" || { cat "$STATE/podrunner.log" >&2; exit 1; }
pid_alive "$STATE/prometheus.pid" || { cat "$STATE/prometheus.log" >&2; exit 1; }
[[ ! -f "$STATE/lws.pid" ]] || pid_alive "$STATE/lws.pid" || { tail -n 30 "$STATE/lws/controller.log" >&2; exit 1; }
log "up in $(($(date +%s) - T0))s: $(kc get nodes --no-headers | wc -l) nodes; Prometheus $(cat "$STATE/prometheus-url")"
echo "export KUBECONFIG=$KUBECONFIG_OUT"
