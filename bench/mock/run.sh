#!/usr/bin/env bash
# One `fulcrum mock-backend` process, pinned to core 0, holding 1,000 concurrent streaming
# requests from the load generator pinned to core 1. Prints a Markdown table per scenario:
# streamed tokens/s, TTFT and latency percentiles, streams held, and the mock's CPU use.
#
#   bash bench/mock/run.sh               # both scenarios, 20 s each
#   DURATION=60 bash bench/mock/run.sh   # longer windows
#
# Needs 2 cores, taskset (util-linux), and about 2,100 file descriptors.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-20}
RAMP=${RAMP:-3}
WARMUP=${WARMUP:-6}
STREAMS=${STREAMS:-1000}
PORT=${PORT:-18080}
CLK_TCK=$(getconf CLK_TCK)

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((2 * STREAMS + 100)) ]; then
    echo "need at least $((2 * STREAMS + 100)) open files (ulimit -n is $(ulimit -n))" >&2
    exit 1
fi

cargo build --release --quiet -p fulcrum --bin fulcrum
cargo build --release --quiet -p fulcrum-mock --example loadgen
MOCK=target/release/fulcrum
LOADGEN=target/release/examples/loadgen

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# scenario NAME MOCK-FLAGS...
scenario() {
    local name=$1
    shift
    echo
    echo "### $name"
    echo
    echo "mock: \`taskset -c 0 $MOCK mock-backend --port $PORT $*\`"
    echo
    echo "load: \`taskset -c 1 $LOADGEN --url http://127.0.0.1:$PORT --concurrency $STREAMS --max-tokens 200 --prompt-tokens 100 --ramp-secs $RAMP --warmup-secs $WARMUP --duration-secs $DURATION\`"
    echo
    taskset -c 0 "$MOCK" mock-backend --port "$PORT" "$@" 2>/dev/null &
    local mock_pid=$!
    taskset -c 1 "$LOADGEN" --url "http://127.0.0.1:$PORT" --concurrency "$STREAMS" --max-tokens 200 \
        --prompt-tokens 100 --ramp-secs "$RAMP" --warmup-secs "$WARMUP" --duration-secs "$DURATION" --wait-ready-secs 10 \
        > "/tmp/fulcrum-bench-mock-$$.txt" &
    local load_pid=$!
    # Sample the mock's CPU time over the measurement window only.
    sleep "$WARMUP"
    sleep 0.5
    local t0 c0 l0 t1 c1 l1
    t0=$(date +%s.%N)
    c0=$(cpu_ticks "$mock_pid")
    l0=$(cpu_ticks "$load_pid")
    sleep "$((DURATION - 1))"
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "$mock_pid")
    l1=$(cpu_ticks "$load_pid")
    local rss_kb
    rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$mock_pid/status")
    wait "$load_pid"
    kill -TERM "$mock_pid"
    wait "$mock_pid" || true
    cat "/tmp/fulcrum-bench-mock-$$.txt"
    rm -f "/tmp/fulcrum-bench-mock-$$.txt"
    awk -v c0="$c0" -v c1="$c1" -v l0="$l0" -v l1="$l1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" -v rss="$rss_kb" \
        'BEGIN { printf "\nCPU over the window: mock %.0f%% of core 0, load generator %.0f%% of core 1; mock resident memory %.0f MiB\n", 100 * (c1 - c0) / hz / (t1 - t0), 100 * (l1 - l0) / hz / (t1 - t0), rss / 1024 }'
}

echo "## fulcrum mock-backend: $STREAMS concurrent streams on one core"
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"

# 1. The model paces the tokens: ITL = 10 ms + 0.005 ms x 1,000 running = 15 ms, so about
#    66,700 tokens/s if the process keeps up.
scenario "modelled pace: ITL 15 ms at 1,000 running" \
    --max-num-seqs 1024 --num-gpu-blocks 100000 --prefill-tokens-per-sec 1000000 --prefill-overhead-ms 0 \
    --itl-base-ms 10 --itl-per-seq-ms 0.005

# 2. The model asks for more than one core can send (ITL 2 ms: 500,000 tokens/s): the
#    ceiling of one process.
scenario "CPU-bound ceiling: ITL 2 ms" \
    --max-num-seqs 1024 --num-gpu-blocks 100000 --prefill-tokens-per-sec 1000000 --prefill-overhead-ms 0 \
    --itl-base-ms 2 --itl-per-seq-ms 0
