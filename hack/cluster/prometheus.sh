#!/usr/bin/env bash
# Prints the Prometheus config of the local cluster: pods are discovered through the local API
# server and scraped when annotated with prometheus.io/scrape: "true" (prometheus.io/port,
# prometheus.io/path as usual). Debian's prometheus is built without kubernetes_sd_configs, so
# discovery is http_sd_configs from the pod runner, which watches all pods and gives the same
# __meta_kubernetes_pod_* labels; the relabelling below is the usual one for kubernetes_sd.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cat <<YAML
global:
  scrape_interval: 2s
  scrape_timeout: 1s
  evaluation_interval: 2s
scrape_configs:
- job_name: kubernetes-pods
  http_sd_configs:
  - url: http://$SD_LISTEN/targets
    refresh_interval: 2s
  relabel_configs:
  - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
    action: keep
    regex: "true"
  # Only addresses in the pod network, which is routed into the project's own namespace only:
  # scrapes never leave the machine (a simulated pod's address there just does not answer).
  - source_labels: [__meta_kubernetes_pod_ip]
    action: keep
    regex: "10\\\\.244\\\\..+"
  - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
    action: replace
    target_label: __metrics_path__
    regex: (.+)
  - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
    action: replace
    regex: (.+);(\\d+)
    replacement: \$1:\$2
    target_label: __address__
  - action: labelmap
    regex: __meta_kubernetes_pod_label_(.+)
  - source_labels: [__meta_kubernetes_namespace]
    target_label: namespace
  - source_labels: [__meta_kubernetes_pod_name]
    target_label: pod
  - source_labels: [__meta_kubernetes_pod_node_name]
    target_label: node
YAML
