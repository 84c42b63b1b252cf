#!/usr/bin/env bash
# `make test-cluster`: installs what the cluster needs, starts it (or reuses a running one), runs
# the cluster tests and stops the cluster again if this run started it. Opt out only explicitly
# with TOPOSERVE_SKIP_CLUSTER=1. Extra pytest arguments: PYTEST_ARGS. The marker expression is
# PYTEST_MARK (default: every cluster test but the KEDA ones and the prometheus-adapter one, which
# `make test-keda` and `make test-hpa` run: each builds its component from the Go module first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${TOPOSERVE_SKIP_CLUSTER:-}" == 1 ]]; then
  echo "################################################################################"
  echo "# CLUSTER TESTS SKIPPED: TOPOSERVE_SKIP_CLUSTER=1 (the tests in tests/cluster did not run)"
  echo "################################################################################"
  exit 0
fi

"$HERE/deps.sh"
started=0
if cluster_healthy; then
  log "reusing the running cluster"
else
  "$HERE/up.sh"
  started=1
fi
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [[ $started == 1 && "${TOPOSERVE_KEEP_CLUSTER:-}" != 1 ]]; then "$HERE/down.sh"; fi
}
trap cleanup EXIT

rc=0
# shellcheck disable=SC2086
# --timeout: no cluster test takes 15 minutes; one that hangs fails instead of using up CI's time.
(cd "$ROOT" && "$PY" -m pytest -m "${PYTEST_MARK:-cluster and not keda and not hpa_adapter}" tests/cluster -ra \
  --timeout "${TOPOSERVE_TEST_TIMEOUT:-900}" ${PYTEST_ARGS:-}) || rc=$?
if [[ $rc == 5 ]]; then
  echo "test-cluster: pytest collected no cluster tests (exit 5): failing, this is never expected" >&2
  exit 1
fi
if [[ $rc != 0 && -d "$STATE" ]]; then
  echo "--- pod runner log (tail) ---" >&2
  tail -n 40 "$STATE/podrunner.log" >&2 || true
fi
exit $rc
