#!/usr/bin/env bash
# Drive the mock engine, unchanged, with guidellm (a standard third-party load generator).
# guidellm is heavy (torch, transformers, datasets), so it lives in its own venv, outside the
# project's dependencies. Everything is offline and on loopback; the run is bounded by a
# request count.
#
#   bash bench/mockengine/guidellm.sh            # venv in /tmp/gvenv, results in bench/mockengine/results
set -euo pipefail
cd "$(dirname "$0")/../.."
GVENV=${GVENV:-/tmp/gvenv}
PORT=${PORT:-18940}
STREAMS=${STREAMS:-64}
REQUESTS=${REQUESTS:-320}
OUT=bench/mockengine/results
mkdir -p "$OUT"
[ -x "$GVENV/bin/guidellm" ] || { python3 -m venv "$GVENV" && "$GVENV/bin/pip" install -q guidellm; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$GVENV/bin/python" bench/mockengine/make_tokenizer.py /tmp/mock-tokenizer

.venv/bin/toposerve mock-engine --host 127.0.0.1 --port "$PORT" --model bench --time-scale 0 \
  --log-level warning &
MOCK=$!
trap 'kill $MOCK 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done

"$GVENV/bin/guidellm" run \
  --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=bench" \
  --profile "kind=concurrent,streams=$STREAMS" \
  --constraint "kind=max_requests,count=$REQUESTS" \
  --tokenizer kind=huggingface_auto,model=/tmp/mock-tokenizer \
  --data kind=synthetic_text,prompt_tokens=256,output_tokens=128 \
  --output kind=json,path=/tmp/guidellm-mock.json \
  --disable-console-interactive 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | tee "$OUT/guidellm_console.txt"
"$GVENV/bin/guidellm" --version | tee -a "$OUT/guidellm_console.txt"
