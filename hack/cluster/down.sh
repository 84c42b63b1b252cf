#!/usr/bin/env bash
# Stops the local cluster and removes everything it made: Prometheus, the pod runner and its
# processes, the kwokctl cluster (etcd, control plane, kwok), the pod network namespace and veth,
# and the .cluster/ state folder. Safe to run when nothing is running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_pidfile "$STATE/prometheus.pid" 10
stop_pidfile "$STATE/lws.pid" 10
# KEDA (hack/keda/up.sh), when it was started.
stop_pidfile "$STATE/keda/adapter.pid" 10
stop_pidfile "$STATE/keda/operator.pid" 10
stop_pidfile "$STATE/prometheus-adapter/adapter.pid" 10
# The runner stops its pods' processes and removes their addresses on SIGTERM.
stop_pidfile "$STATE/podrunner.pid" 30
if [[ -x "$CLUSTER_BIN/kwokctl" && -d "$KWOK_WORKDIR/clusters/$CLUSTER_NAME" ]]; then
  log "deleting kwokctl cluster $CLUSTER_NAME"
  "$CLUSTER_BIN/kwokctl" delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
fi
if ! check_owner; then
  log "leaving the pod network alone: it belongs to another checkout's running cluster"
elif ip netns list 2>/dev/null | grep -qw "$NETNS"; then
  # Pods' own namespaces (tsp-<pod ip>, made by the runner): their processes, then the namespaces.
  for pod_ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^tsp-10-244-/ {print $1}'); do
    for pid in $(ip netns pids "$pod_ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns delete "$pod_ns" 2>/dev/null || true
  done
  # Anything still in the namespace was started by this project's runner: end it by its id.
  for pid in $(ip netns pids "$NETNS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns delete "$NETNS"
  log "removed netns $NETNS"
fi
# Deleting the namespace removes the veth pair and its route; this covers a half-made one.
if check_owner 2>/dev/null; then
  ip link delete "$VETH_HOST" 2>/dev/null || true
  rm -f "$OWNER_FILE"
fi
rm -rf "$STATE"
log "cluster down"
