#!/usr/bin/env bash
# AI routing benchmark, in one run: one shared-prefix multi-turn streaming chat workload
# (workload.py) against one heterogeneous fleet of 6 mock backends (2 h100, 2 a100, 2 l4,
# small KV caches so that placement matters) through:
#   Fulcrum's prefix_affinity, score, least_tokens, power_of_two and round_robin policies,
#   sglang-router (cache_aware, round_robin) and vllm-router (cache_aware, round_robin)
#   from PyPI.
# Every configuration gets a fresh fleet (empty caches). Reported: throughput, TTFT p50/p99
# and end-to-end p99 (client side), prefix-cache hit rate (from the backends' counters), and
# max/mean requests per backend. The table replaces the ai-routing section of
# bench/RESULTS.md.
#
# Usage: bench/ai-routing/run.sh [conversations, default 96] [concurrency, default 32]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
CONVERSATIONS=${1:-96}
CONCURRENCY=${2:-32}
WORK=$(mktemp -d /tmp/fulcrum-ai-bench.XXXXXX)
PIDS=()
stop_all() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

python3 -c "import aiohttp" 2>/dev/null && command -v sglang-router >/dev/null && command -v vllm-router >/dev/null || {
  echo "== installing sglang-router, vllm-router and aiohttp (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check sglang-router vllm-router aiohttp
}
echo "== building fulcrum (release)"
cargo build --release --locked -q -p fulcrum
FULCRUM=$ROOT/target/release/fulcrum

GPUS=(h100 h100 a100 a100 l4 l4)
WEIGHTS=(4 4 2 2 1 1)
BASE=19300
ROUTER_PORT=19400

wait_http() {
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 1 "$1" && return 0
    sleep 0.1
  done
  echo "$1 did not answer" >&2; return 1
}

start_fleet() {
  for i in "${!GPUS[@]}"; do
    "$FULCRUM" mock-backend --port $((BASE + i)) --model llama --gpu "${GPUS[$i]}" \
      --num-gpu-blocks 600 --seed $((i + 1)) 2>>"$WORK/mocks.log" &
    PIDS+=($!)
  done
  for i in "${!GPUS[@]}"; do wait_http "http://127.0.0.1:$((BASE + i))/health"; done
}

fleet_totals() { # prints: hit_rate max_over_mean
  python3 - "$BASE" "${#GPUS[@]}" <<'PY'
import re, sys, urllib.request
base, n = int(sys.argv[1]), int(sys.argv[2])
queries = hits = 0.0
reqs = []
for i in range(n):
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + i}/metrics", timeout=5).read().decode()
    def value(name):
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total
    queries += value("vllm:prefix_cache_queries_total")
    hits += value("vllm:prefix_cache_hits_total")
    reqs.append(value("vllm:request_success_total"))
mean = sum(reqs) / len(reqs) if reqs else 0
print(f"{(hits / queries if queries else 0):.3f} {(max(reqs) / mean if mean else 0):.2f} {'/'.join(str(int(r)) for r in reqs)}")
PY
}

urls() { for i in "${!GPUS[@]}"; do printf 'http://127.0.0.1:%d ' $((BASE + i)); done; }

start_router() { # kind policy
  local kind=$1 policy=$2
  case $kind in
    fulcrum)
      {
        echo "[proxy]"; echo "workers = 1"
        echo "[[listener]]"; echo "name = \"public\""; echo "address = \"127.0.0.1:$ROUTER_PORT\""; echo "pool = \"fleet\""
        echo "[pool.fleet]"; echo "policy = \"$policy\""
        echo "engine_metrics = { interval = \"200ms\" }"
        echo "endpoints = ["
        for i in "${!GPUS[@]}"; do
          echo "  { address = \"127.0.0.1:$((BASE + i))\", weight = ${WEIGHTS[$i]}, labels = { gpu = \"${GPUS[$i]}\" } },"
        done
        echo "]"
      } > "$WORK/fulcrum.toml"
      "$FULCRUM" serve -c "$WORK/fulcrum.toml" 2>>"$WORK/router.log" &
      ;;
    sglang)
      sglang-router launch --worker-urls $(urls) --policy "$policy" --host 127.0.0.1 --port $ROUTER_PORT \
        --prometheus-port $((ROUTER_PORT + 90)) --log-level warn >>"$WORK/router.log" 2>&1 &
      ;;
    vllm)
      vllm-router --worker-urls $(urls) --policy "$policy" --host 127.0.0.1 --port $ROUTER_PORT \
        --log-level warning >>"$WORK/router.log" 2>&1 &
      ;;
  esac
  PIDS+=($!)
  # Ready when a request goes through.
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$ROUTER_PORT/v1/chat/completions" \
      -H 'content-type: application/json' -d '{"model":"llama","max_tokens":1,"messages":[{"role":"user","content":"ping"}]}' \
      | grep -q 200 && return 0
    sleep 0.2
  done
  echo "router $kind $policy did not become ready; log:" >&2; tail -20 "$WORK/router.log" >&2; return 1
}

ROWS=()
run_one() { # label kind policy
  local label=$1 kind=$2 policy=$3
  start_fleet
  if ! start_router "$kind" "$policy"; then stop_all; ROWS+=("| $label | failed to start | | | | | |"); return; fi
  local out
  out=$(python3 "$ROOT/bench/ai-routing/workload.py" --url "http://127.0.0.1:$ROUTER_PORT" \
    --conversations "$CONVERSATIONS" --concurrency "$CONCURRENCY")
  read -r hit skew per <<<"$(fleet_totals)"
  stop_all
  local row
  row=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"| {sys.argv[2]} | {d['req_per_s']} | {d['tokens_per_s']} | {d['ttft_p50_ms']} | {d['ttft_p99_ms']} | {d['e2e_p99_ms']} | {float(sys.argv[3])*100:.1f}% | {sys.argv[4]} ({sys.argv[5]}) | {d['failed']} |\")" "$out" "$label" "$hit" "$skew" "$per")
  ROWS+=("$row")
  echo "$row"
}

run_one "fulcrum prefix_affinity" fulcrum prefix_affinity
run_one "fulcrum score" fulcrum score
run_one "fulcrum least_tokens" fulcrum least_tokens
run_one "fulcrum power_of_two" fulcrum power_of_two
run_one "fulcrum round_robin" fulcrum round_robin
run_one "sglang-router cache_aware" sglang cache_aware
run_one "sglang-router round_robin" sglang round_robin
run_one "vllm-router cache_aware" vllm cache_aware
run_one "vllm-router round_robin" vllm round_robin

CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
SGL=$(python3 -m pip show sglang-router 2>/dev/null | awk '/^Version/ {print $2}')
VLR=$(python3 -m pip show vllm-router 2>/dev/null | awk '/^Version/ {print $2}')
{
  echo "<!-- ai-bench:start -->"
  echo "Date: $(date -u +%Y-%m-%d), machine: $CPU, $(nproc) cores. Command: \`bench/ai-routing/run.sh $CONVERSATIONS $CONCURRENCY\`"
  echo "(sglang-router $SGL, vllm-router $VLR; fleet: 6 mock backends, 2 h100, 2 a100, 2 l4, 600 KV blocks each;"
  echo "$CONVERSATIONS conversations of 4 turns over 4 shared ~1,500-token system prompts, $CONCURRENCY at once, streaming, 32 output tokens)."
  echo
  echo "| router and policy | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | e2e p99 ms | prefix-cache hit rate | max/mean requests per backend | failed |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
  printf '%s\n' "${ROWS[@]}"
  echo "<!-- ai-bench:end -->"
} > "$WORK/section.md"
cat "$WORK/section.md"
RESULTS=$ROOT/bench/RESULTS.md
if grep -q "<!-- ai-bench:start -->" "$RESULTS"; then
  python3 - "$RESULTS" "$WORK/section.md" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().strip()
text = open(path).read()
text = re.sub(r"<!-- ai-bench:start -->.*?<!-- ai-bench:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
  echo "== updated $RESULTS"
fi
