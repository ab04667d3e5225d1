#!/usr/bin/env bash
# Batch beside interactive traffic (issue P2.2): does a large batch submitted through
# Fulcrum's Batch API leave interactive latency alone while it uses the capacity that
# interactive traffic leaves? Measured side by side, in one run, with a naive client doing
# the same batch from a thread pool straight to the backends.
#
# Fleet: 4 `fulcrum mock-backend` processes (release build) on 127.0.0.1, each with
# --max-num-seqs $SEQS batch slots (default 8: the engine's real capacity is then 8
# sequences, twice Fulcrum's assumed 4 per endpoint), --speed $SPEED (default 2),
# --output-len-median 32, distinct seeds. Every request is the same shape: one user message
# of $PROMPT_CHARS characters of random words (~$PROMPT_CHARS/4 tokens, no shared prefix)
# and max_tokens $MAX_TOKENS, so with the defaults a request alone takes ~20 ms to its first
# token and ~150 ms in all. `fulcrum serve` fronts them: one listener, pool `llm` (default
# LLM policy with engine metrics every 200 ms, no admission control), `[batch]` with its
# database in a temporary directory and every other batch setting at its default.
#
# Steps:
#  1. Capacity: closed-loop streaming chat requests through the proxy at concurrency
#     4, 8, 12, 16, 24, 32, 48, 64, 96, 128 ($CAP_SECONDS s each after a 2 s warm-up),
#     stopping when two levels in a row fail to beat the best by 3%; capacity = the best
#     requests/s.
#  2. Phase A, alone: open-loop Poisson interactive traffic at $LOAD% of capacity through
#     the proxy, streaming ("stream": true), for $DURATION s. TTFT = time to the first byte of
#     the response body.
#  3. Phase B, Fulcrum batch: the same traffic (same seed: the same arrival times and prompt
#     lengths; each phase has prompts of its own words, so that none finds another's in the
#     engines' prefix caches, and the table shows the hit rate) beside a
#     batch of non-streaming chat requests of the same shape (enough to outlast the phase),
#     uploaded through POST /v1/files and started with POST /v1/batches, $WARMUP s before the
#     traffic starts; its throughput is its request_counts.completed over the traffic's window
#     (GET /v1/batches/{id}); then POST /v1/batches/{id}/cancel.
#  4. Phase C, naive client: the same traffic beside a thread pool of $WORKERS workers (a
#     separate Python process) sending the same batch (the same requests but for their words,
#     as for the interactive prompts) straight to the 4 backends,
#     round robin, each worker one request at a time; started $WARMUP s before the traffic.
#  5. Phase A again (alone), to show the run's own noise on TTFT.
# Also reported per phase: the engines' running and waiting sequences (their /metrics every
# 0.5 s, summed over the fleet), the machine's CPU use (/proc/stat) and how late the load
# generator sent its requests.
# Batch share of remaining capacity = batch req/s / (capacity - interactive rate).
#
# With ENGINE_PRIORITY=N the engines schedule by priority (`--scheduling-policy priority`,
# as vLLM's: lower first, a running request of a higher value preempted for a waiting one),
# Fulcrum's config has `[batch] engine_priority = N`, and the naive client's batch lines
# carry `"priority": N` too: both batch clients are told the same.
#
# Usage: bench/batch/run.sh   (env: DURATION=60 LOAD=60 WORKERS=32 SEQS=8 SPEED=2
#          MAX_TOKENS=32 PROMPT_CHARS=1600 CAP_SECONDS=6 WARMUP=5 SEED=1 CAPACITY=<req/s>
#          to skip step 1, ENGINE_PRIORITY=<n>, POLICY=<the pool's policy; default: Fulcrum's>)
# Smoke run: DURATION=10 CAP_SECONDS=3 bench/batch/run.sh. The full run takes about 6 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

DURATION=${DURATION:-60}
LOAD=${LOAD:-60}
WORKERS=${WORKERS:-32}
SEQS=${SEQS:-8}
SPEED=${SPEED:-2}
MAX_TOKENS=${MAX_TOKENS:-32}
PROMPT_CHARS=${PROMPT_CHARS:-1600}
CAP_SECONDS=${CAP_SECONDS:-6}
WARMUP=${WARMUP:-5}
SEED=${SEED:-1}
CAPACITY=${CAPACITY:-}
ENGINE_PRIORITY=${ENGINE_PRIORITY:-}
POLICY=${POLICY:-}
SCHEDULING=()
if [ -n "$ENGINE_PRIORITY" ]; then SCHEDULING=(--scheduling-policy priority); fi
FULCRUM=${FULCRUM:-$ROOT/target/release/fulcrum}
PY=${PYTHON:-python3}
LOADPY=$ROOT/bench/batch/load.py

[ -x "$FULCRUM" ] || { echo "no release binary at $FULCRUM: cargo build --release -p fulcrum" >&2; exit 1; }
"$PY" -c "import aiohttp" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check aiohttp

WORK=$(mktemp -d /tmp/fulcrum-batch-bench.XXXXXX)
PIDS=() # the mocks and the proxy
CUR=    # the load generator running now
stop_all() {
  local p
  [ -n "$CUR" ] && PIDS+=("$CUR") && CUR=
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# Runs a command in the background so that a signal stops it at once (the traps above), and
# waits for it.
run() {
  "$@" &
  CUR=$!
  wait "$CUR"
  CUR=
}

T_START=$(date +%s)
echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== fulcrum: $FULCRUM ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"

# --- the fleet -----------------------------------------------------------------------------
BACKENDS=()
for i in 1 2 3 4; do
  "$FULCRUM" mock-backend --port 0 --speed "$SPEED" --max-num-seqs "$SEQS" --output-len-median 32 \
    --seed "$((SEED * 100 + i))" "${SCHEDULING[@]}" >"$WORK/mock$i.out" 2>"$WORK/mock$i.err" &
  PIDS+=($!)
done
for i in 1 2 3 4; do
  port=
  for _ in $(seq 1 100); do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$WORK/mock$i.err" 2>/dev/null | grep -o '[0-9]*$' || true)
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "mock $i did not start:" >&2; cat "$WORK/mock$i.err" >&2; exit 1; }
  BACKENDS+=("127.0.0.1:$port")
done
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
{
  echo "[[listener]]"
  echo "name = \"public\""
  echo "address = \"127.0.0.1:$PORT\""
  echo "pool = \"llm\""
  echo
  echo "[pool.llm]"
  if [ -n "$POLICY" ]; then echo "policy = \"$POLICY\""; fi
  echo "engine_metrics = { interval = \"200ms\" }"
  echo "endpoints = ["
  for b in "${BACKENDS[@]}"; do echo "  { address = \"$b\" },"; done
  echo "]"
  echo
  echo "[batch]"
  echo "database = \"$WORK/batch.db\""
  if [ -n "$ENGINE_PRIORITY" ]; then echo "engine_priority = $ENGINE_PRIORITY"; fi
} >"$WORK/fulcrum.toml"
"$FULCRUM" serve -c "$WORK/fulcrum.toml" >"$WORK/fulcrum.out" 2>"$WORK/fulcrum.err" &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -fs -o /dev/null "$URL/v1/batches" && break
  sleep 0.1
done
curl -fs -o /dev/null "$URL/v1/batches" || { echo "fulcrum serve did not start:" >&2; cat "$WORK/fulcrum.err" >&2; exit 1; }
sleep 1 # a first engine-metrics scrape
echo "== fleet: 4 x \`fulcrum mock-backend --speed $SPEED --max-num-seqs $SEQS --output-len-median 32 ${SCHEDULING[*]:-}\` (${BACKENDS[*]}); requests: $PROMPT_CHARS-character prompts, max_tokens $MAX_TOKENS"
echo "== proxy: \`fulcrum serve\` on $URL, pool llm (engine_metrics 200ms, policy ${POLICY:-default}), [batch] defaults${ENGINE_PRIORITY:+ but engine_priority = $ENGINE_PRIORITY}"

SHAPE=(--prompt-chars "$PROMPT_CHARS" --max-tokens "$MAX_TOKENS")

# --- 1. capacity ---------------------------------------------------------------------------
if [ -n "$CAPACITY" ]; then
  echo "== capacity: given, $CAPACITY requests/s"
  echo "{\"capacity\": $CAPACITY, \"levels\": []}" >"$WORK/capacity.json"
  CAP_HOW="given (CAPACITY=$CAPACITY)"
else
  echo "== capacity: closed-loop streaming requests through the proxy, ${CAP_SECONDS} s per level after 2 s"
  run "$PY" "$LOADPY" capacity --url "$URL" --seconds "$CAP_SECONDS" --warmup 2 \
    --out "$WORK/capacity.json" "${SHAPE[@]}" >"$WORK/capacity.txt"
  CAPACITY=$(cat "$WORK/capacity.txt")
  CAP_HOW="closed loop through the proxy: $("$PY" "$LOADPY" levels --capacity "$WORK/capacity.json") requests/s by concurrency"
fi
RATE=$("$PY" -c "print(round($CAPACITY * $LOAD / 100, 2))")
REMAINING=$("$PY" -c "print(round($CAPACITY - $RATE, 2))")
echo "== capacity $CAPACITY requests/s; interactive rate $RATE requests/s ($LOAD%); remaining $REMAINING requests/s"

# The batch: enough requests for the whole fleet's capacity over the phase and then some.
NBATCH=$("$PY" -c "import math; print(min(50000, math.ceil($CAPACITY * ($DURATION + $WARMUP + 20))))")
# Two copies of the same batch, of different words, so that the naive client does not find
# the Fulcrum batch's prompts in the prefix caches.
"$PY" "$LOADPY" make-batch --n "$NBATCH" --seed 101 --out "$WORK/batch-B.jsonl" "${SHAPE[@]}"
"$PY" "$LOADPY" make-batch --n "$NBATCH" --seed 102 --out "$WORK/batch-C.jsonl" "${SHAPE[@]}" \
  ${ENGINE_PRIORITY:+--priority "$ENGINE_PRIORITY"}
echo "== batch: $NBATCH requests ($(du -h "$WORK/batch-B.jsonl" | cut -f1)), non-streaming, same shape"

# --- 2-5. the phases -----------------------------------------------------------------------
phase() { # NAME MODE PROMPT-SEED
  echo "== phase $1: $DURATION s"
  run "$PY" "$LOADPY" phase --url "$URL" --mode "$2" --rate "$RATE" --seconds "$DURATION" --seed "$SEED" --prompt-seed "$3" \
    --batch-file "$WORK/batch-$1.jsonl" --batch-warmup "$WARMUP" --workers "$WORKERS" \
    --backends "$(IFS=,; echo "${BACKENDS[*]}")" --out "$WORK/$1.json" "${SHAPE[@]}"
  sleep 3 # the engines drain
}
phase A alone 1
phase B fulcrum 2
phase C naive 3
phase A2 alone 4

echo
echo "Capacity: $CAPACITY requests/s ($CAP_HOW)."
echo "Interactive: Poisson, $RATE requests/s ($LOAD% of capacity), $DURATION s, seed $SEED, streaming."
echo "Batch: $NBATCH requests; Fulcrum through its Batch API; naive: $WORKERS threads straight to the 4 backends, round robin."
echo "Remaining capacity: $REMAINING requests/s."
echo
"$PY" "$LOADPY" report --capacity "$WORK/capacity.json" \
  "A. interactive alone=$WORK/A.json" "B. + Fulcrum batch (Batch API)=$WORK/B.json" \
  "C. + naive client ($WORKERS threads)=$WORK/C.json" "A'. interactive alone, again=$WORK/A2.json"
echo
"$PY" "$LOADPY" notes --alone "$WORK/A.json" --fulcrum "$WORK/B.json" --naive "$WORK/C.json"
echo "== done in $(( $(date +%s) - T_START )) s"
