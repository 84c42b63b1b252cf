# Shared settings of the local cluster scripts (sourced, not run).
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=versions.sh
source "$HERE/versions.sh"

STATE=${CLUSTER_STATE:-$ROOT/.cluster}
CLUSTER_NAME=${CLUSTER_NAME:-toposerve}
CLUSTER_PROFILE=${CLUSTER_PROFILE:-gpu}
KUBECONFIG_OUT=$STATE/kubeconfig
POD_KUBECONFIG=$STATE/kubeconfig-pods
PROM_PORT=${TOPOSERVE_PROMETHEUS_PORT:-19090}
SD_LISTEN=127.0.0.1:$((PROM_PORT + 1))
PY=${PY:-$ROOT/.venv/bin/python}
KUBECTL=$CLUSTER_BIN/kubectl

# The pod network: one namespace holds every pod IP (10.244.<node>.x, see fleet.yaml); the host
# reaches it through a veth pair whose host end is also how pods reach the API server.
NETNS=${TOPOSERVE_NETNS:-toposerve-pods}
VETH_HOST=tspod0
VETH_NS=tspod1
HOST_ADDR=10.243.0.1
NS_ADDR=10.243.0.2
POD_NETWORK=10.244.0.0/16

# The netns is machine-wide: this file names the checkout whose cluster made it.
OWNER_FILE=/run/toposerve/$NETNS.owner

export KWOK_WORKDIR=$STATE/kwok

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stop the process whose id is in pidfile $1 (and only that one), waiting up to $2 seconds.
stop_pidfile() {
  local f=$1 wait=${2:-10} pid
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((wait * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cluster_healthy() {
  [[ -f "$KUBECONFIG_OUT" && -x "$KUBECTL" ]] &&
    kc get --raw /readyz >/dev/null 2>&1 &&
    pid_alive "$STATE/podrunner.pid" && pid_alive "$STATE/prometheus.pid" &&
    { [[ ! -f "$STATE/lws.pid" ]] || pid_alive "$STATE/lws.pid"; } &&
    ip netns list 2>/dev/null | grep -qw "$NETNS"
}

# Fail if another checkout's cluster is alive on this machine (its netns and ports would clash);
# a dead one (say, from a stopped session) is fair game and gets cleaned up.
check_owner() {
  local owner
  [[ -f "$OWNER_FILE" ]] || return 0
  owner=$(cat "$OWNER_FILE")
  if [[ "$owner" != "$STATE" ]] && pid_alive "$owner/podrunner.pid"; then
    echo "another local cluster is running from $owner: stop it there (make cluster-down) first" >&2
    return 1
  fi
}
