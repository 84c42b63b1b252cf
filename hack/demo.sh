#!/usr/bin/env bash
# `make demo`: the main job on a fresh machine. Today it is the offline part: plan every example
# for the default heterogeneous fleet, print where each replica goes and why, and render every
# Kubernetes object to .demo/. (The operator issue grows this into a live demo on the local cluster.)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=.demo
mkdir -p "$OUT"

echo "== toposerve $($BIN/toposerve --version | cut -d' ' -f2): planning the examples =="
echo
for f in examples/*.yaml; do
  echo "--- $f"
  $BIN/toposerve plan -f "$f"
  $BIN/toposerve render -f "$f" > "$OUT/$(basename "$f" .yaml).rendered.yaml"
  echo
done

echo "== The same examples planned against the local cluster's simulated fleet (hack/cluster/fleet.yaml) =="
$BIN/python -m toposerve.dev.fleet hack/cluster/fleet.yaml --profile gpu > "$OUT/fleet-nodes.yaml"
if [ -s "$OUT/fleet-nodes.yaml" ]; then
  for f in examples/*.yaml; do
    $BIN/toposerve plan -f "$f" --inventory "$OUT/fleet-nodes.yaml" | sed -n '2,$p'
  done
else
  echo "(fleet inventory not available yet; skipped)"
fi
echo
echo "Rendered objects: $OUT/*.rendered.yaml   (kubectl apply --dry-run=client -f them, or read them)"
echo "CRD:              crds/toposerve.io_llmdeployments.yaml   (toposerve crd)"
echo "Next:             toposerve plan -f examples/heterogeneous.yaml -o json | less"
