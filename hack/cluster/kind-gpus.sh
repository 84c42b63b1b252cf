#!/usr/bin/env bash
# For kind clusters made from kind-config.yaml: give every node labelled nvidia.com/gpu.count the
# matching nvidia.com/gpu capacity (kind cannot declare extended resources; the kubelet keeps
# patched extended resources it does not manage).
set -euo pipefail
KUBECTL=${KUBECTL:-kubectl}
for node in $($KUBECTL get nodes -l nvidia.com/gpu.count -o name); do
  count=$($KUBECTL get "$node" -o jsonpath='{.metadata.labels.nvidia\.com/gpu\.count}')
  $KUBECTL patch "$node" --subresource=status --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$count\"}]"
  echo "$node: nvidia.com/gpu=$count"
done
