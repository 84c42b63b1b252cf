# Pinned versions of everything the local cluster runs; sourced by the cluster scripts.
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
# Kubernetes v1.35 builds with the installed Go 1.26 and is supported by kwok v0.8.
K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
LWS_VERSION=v0.8.0
# CI may run without HOME; Go and the cache below need it.
export HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
TOPOSERVE_CACHE=${TOPOSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/toposerve}
CLUSTER_BIN=${CLUSTER_BIN:-$TOPOSERVE_CACHE/k8s-$K8S_VERSION/bin}
# KEDA (issue 10's keda mode, `make test-keda`): operator and metrics adapter from the module.
KEDA_VERSION=v2.21.0
KEDA_BIN=${KEDA_BIN:-$TOPOSERVE_CACHE/keda-$KEDA_VERSION/bin}
