#!/usr/bin/env bash
# Drive the mock engine, unchanged, with inference-perf (kubernetes-sigs' load generator).
# inference-perf needs Python >= 3.12 and lives in its own venv; offline, loopback only,
# bounded by a request count. Afterwards the mock's own /metrics are saved, to show the shared
# system prompts hitting its prefix cache.
#
#   PY312=/root/.pyenv/versions/3.12.1/bin/python bash bench/mockengine/inference_perf.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY312=${PY312:-python3.12}
IPVENV=${IPVENV:-/tmp/ipvenv}
PORT=${PORT:-18960}
OUT=bench/mockengine/results
REPORTS=$(mktemp -d /tmp/ip-reports.XXXX)
mkdir -p "$OUT"
[ -x "$IPVENV/bin/inference-perf" ] || { "$PY312" -m venv "$IPVENV" && "$IPVENV/bin/pip" install -q inference-perf; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$IPVENV/bin/python" bench/mockengine/make_tokenizer.py /tmp/mock-tokenizer
CONFIG=$(mktemp /tmp/inference-perf.XXXX.yml)
sed -e "s#@PORT@#$PORT#" -e "s#@TOKENIZER@#/tmp/mock-tokenizer#" -e "s#@REPORTS@#$REPORTS#" \
  bench/mockengine/inference_perf.yml > "$CONFIG"

.venv/bin/toposerve mock-engine --host 127.0.0.1 --port "$PORT" --model bench --time-scale 0 \
  --log-level warning &
MOCK=$!
trap 'kill $MOCK 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done

"$IPVENV/bin/inference-perf" --config_file "$CONFIG" 2>&1 | tail -40 | tee "$OUT/inference_perf_console.txt"
cp "$REPORTS/summary_lifecycle_metrics.json" "$OUT/inference_perf_summary.json"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^vllm:(prefix_cache|request_success|generation_tokens|prompt_tokens)' \
  | tee "$OUT/inference_perf_mock_metrics.txt"
"$IPVENV/bin/pip" show inference-perf | grep -i '^version' | tee -a "$OUT/inference_perf_console.txt"
