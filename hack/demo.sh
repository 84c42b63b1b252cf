#!/usr/bin/env bash
# `make demo`: the main job on a fresh machine.
#   1. plan every example offline and against the simulated fleet (why each GPU type was chosen);
#   2. bring up the local cluster (real control plane + kwok GPU fleet; binaries build the first time);
#   3. install the operator with the Helm chart (it runs as a pod under its own ServiceAccount),
#      apply the quickstart, the heterogeneous example and a simulated-vLLM 70B;
#   4. wait for Ready, send chat completions through the chart's gateway (which replica took each
#      and why), print where every replica landed.
# The cluster's GPUs are simulated, so the operator runs with autoEngine: mock (hack/demo-config.yaml,
# passed as the chart's operatorConfig):
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

say "operator: helm install toposerve charts/toposerve (a pod under its own ServiceAccount)"
# The chart installs the CRD only when it is missing; a development checkout may have changed it.
$KC apply --server-side --force-conflicts -f crds/ >/dev/null
# (`kubectl wait` fails at once while a new CRD has no conditions yet: poll first.)
for _ in $(seq 120); do
  [[ $($KC get crd llmdeployments.toposerve.io \
    -o jsonpath='{.status.conditions[?(@.type=="Established")].status}') == True ]] && break
  sleep 0.5
done
$BIN/python - "$OUT/values.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open("hack/demo-config.yaml")) or {}
# The gateway says which replica took each request and why (x-toposerve-backend / -route-reason).
values = {"operatorConfig": config, "operator": {"fallbackAfterSeconds": 20},
          "gateway": {"extraArgs": ["--expose-backend"]}}
yaml.safe_dump(values, open(sys.argv[1], "w"))
PY
"$CLUSTER_BIN/helm" upgrade --install toposerve charts/toposerve -n toposerve-system --create-namespace \
  -f "$OUT/values.yaml" --wait --timeout 5m >/dev/null
"$CLUSTER_BIN/helm" status toposerve -n toposerve-system
$KC get pods -n toposerve-system -o wide

say "apply: quickstart, heterogeneous (mock engines that serve) and llama-70b (simulated vLLM on H100)"
$KC create namespace $NS --dry-run=client -o yaml | $KC apply -f - >/dev/null
$KC apply -n $NS -f examples/quickstart.yaml -f examples/heterogeneous.yaml
# Simulated vLLM pods answer no HTTP, so the gateway must not route its model name to them (the
# mixed example serves the same name and answers): routing.mode none.
sed 's/^spec:/spec:\n  engine: vllm\n  routing: {mode: none}/' examples/llama-70b-h100.yaml | $KC apply -n $NS -f -

say "waiting for Ready"
$KC wait -n $NS --for=condition=Ready llmd --all --timeout=300s
$KC get llmd -n $NS

say "chat completions through the gateway: one endpoint, the request's model picks the deployment"
$BIN/python hack/demo_report.py "$KC" $NS chat toposerve-system/toposerve-gateway quickstart llama-70b-mixed

say "where every replica landed, and why"
$BIN/python hack/demo_report.py "$KC" $NS placement
echo "Why these GPU types (and why others were skipped): toposerve plan -f examples/<file> --inventory .demo/fleet-nodes.yaml"

say "explore"
cat <<EOF
  export KUBECONFIG=$KUBECONFIG
  $KC get llmd -A                      # printer columns: model, GPU, TP/PP, ready, desired, endpoint
  $KC describe llmd llama-70b -n $NS   # conditions and Events
  $KC scale llmd quickstart -n $NS --replicas=3
  $KC port-forward -n toposerve-system svc/toposerve-gateway 8080:80 &   # one endpoint, every model:
  curl -s localhost:8080/v1/models; curl -s localhost:8080/health      # which models are routable
  $KC explain llmd.spec --recursive
  $CLUSTER_BIN/helm status toposerve -n toposerve-system
  tail -f .cluster/pods/toposerve-system_toposerve-*_operator.log   # the operator pods' output
Tear down:  make demo-down   (stops the cluster with the operator in it, leaves nothing behind)
EOF
