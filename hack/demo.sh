#!/usr/bin/env bash
# `make demo`: the main job on a fresh machine.
#   1. plan every example offline and against the simulated fleet (why each GPU type was chosen);
#   2. bring up the local cluster (real control plane + kwok GPU fleet; binaries build the first time);
#   3. run the operator, apply the quickstart, the heterogeneous example and a simulated-vLLM 70B;
#   4. wait for Ready, send chat completions to the serving pods, print where every replica landed.
# The cluster's GPUs are simulated, so the operator runs with autoEngine: mock (hack/demo-config.yaml):
# engine auto serves the CPU mock engine, placed on nodes of the planned GPU type. The 70B example is
# forced to engine vllm: its pods request real nvidia.com/gpu from the scheduler and kwok runs them.
# DEMO_OFFLINE=1 stops after step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
OUT=$ROOT/.demo
NS=demo
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "toposerve $($BIN/toposerve --version | cut -d' ' -f2): the plan of every example (no cluster needed)"
$BIN/python -m toposerve.dev.fleet hack/cluster/fleet.yaml --profile gpu > "$OUT/fleet-nodes.yaml"
$BIN/toposerve plan -f examples/quickstart.yaml | head -1
for f in examples/*.yaml; do
  $BIN/toposerve plan -f "$f" --inventory "$OUT/fleet-nodes.yaml" > "$OUT/plan.txt"
  sed -n '2,$p' "$OUT/plan.txt"
  $BIN/toposerve render -f "$f" --inventory "$OUT/fleet-nodes.yaml" > "$OUT/$(basename "$f" .yaml).rendered.yaml"
done
echo "(rendered objects: $OUT/*.rendered.yaml; reasons for skipped GPU types: toposerve plan -f FILE)"
[[ "${DEMO_OFFLINE:-0}" == 1 ]] && exit 0

say "local cluster (first run builds Kubernetes from Go modules: expect tens of minutes on 2 cores)"
make --no-print-directory cluster-up
export KUBECONFIG=$ROOT/.cluster/kubeconfig
source hack/cluster/versions.sh
KC="$CLUSTER_BIN/kubectl"

say "operator: toposerve run (log: .cluster/operator.log)"
$KC apply --server-side --force-conflicts -f crds/ >/dev/null
$KC wait --for=condition=Established crd/llmdeployments.toposerve.io --timeout=60s >/dev/null
if [[ -f .cluster/operator.pid ]] && kill -0 "$(cat .cluster/operator.pid)" 2>/dev/null; then
  echo "already running (pid $(cat .cluster/operator.pid))"
else
  nohup $BIN/toposerve run --config hack/demo-config.yaml --metrics-port 0 --fallback-after 20 \
    >> .cluster/operator.log 2>&1 &
  echo $! > .cluster/operator.pid
  echo "started (pid $!)"
fi

say "apply: quickstart, heterogeneous (mock engines that serve) and llama-70b (simulated vLLM on H100)"
$KC create namespace $NS --dry-run=client -o yaml | $KC apply -f - >/dev/null
$KC apply -n $NS -f examples/quickstart.yaml -f examples/heterogeneous.yaml
sed 's/^spec:/spec:\n  engine: vllm/' examples/llama-70b-h100.yaml | $KC apply -n $NS -f -

say "waiting for Ready"
$KC wait -n $NS --for=condition=Ready llmd --all --timeout=300s
$KC get llmd -n $NS

say "chat completions, straight to each serving pod (pod IPs from the Services' EndpointSlices)"
$BIN/python hack/demo_report.py "$KC" $NS chat quickstart llama-70b-mixed

say "where every replica landed, and why"
$BIN/python hack/demo_report.py "$KC" $NS placement
echo "Why these GPU types (and why others were skipped): toposerve plan -f examples/<file> --inventory .demo/fleet-nodes.yaml"

say "explore"
cat <<EOF
  export KUBECONFIG=$KUBECONFIG
  $KC get llmd -A                      # printer columns: model, GPU, TP/PP, ready, desired, endpoint
  $KC describe llmd llama-70b -n $NS   # conditions and Events
  $KC scale llmd quickstart -n $NS --replicas=3
  $KC explain llmd.spec --recursive
  tail -f .cluster/operator.log
Tear down:  make demo-down   (stops the operator and the cluster, leaves nothing behind)
EOF
