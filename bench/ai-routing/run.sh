#!/usr/bin/env bash
# AI routing over sockets (issue P1.2's acceptance test): Fulcrum's default LLM policy,
# predicted_ttft, against smg (Shepherd Model Gateway, SGLang's gateway) cache_aware,
# vllm-router cache_aware, and Fulcrum's least_connections and prefix_affinity, on one
# heterogeneous mock fleet, open-loop, at 50%, 80% and 95% of the fleet's capacity, on three
# workloads.
#
# Fleet: 4 `fulcrum mock-backend` processes, all `--gpu h100` with 4 batch slots, 16 ms
# inter-token latency and 1,000 KV blocks of 16 tokens, whose speeds (`--speed` 1, 1, 0.5, 2)
# are set on the mocks only: no router is told them (Fulcrum's endpoints have no weight and
# no labels; the peers get bare worker URLs). Every (router, workload, load) cell gets a fresh
# fleet, so every cell starts with empty caches and nothing learned.
#
# Workloads (workload.py): multi-turn streaming chats (4 turns, 200 ms mean think time, each
# turn resending the history, 60-token user turns, 32 output tokens) over ~1,500-token system
# prompts:
#   chat    4 shared system prompts (the default chat workload);
#   shared  1 system prompt for every request;
#   groups  16 prompt groups: 16 x ~95 blocks, more than one backend's 1,000-block cache holds
#           (about 6 once the running sequences have their blocks), less than the fleet's.
# Conversations start at Poisson times (open loop) for --seconds; the request rate offered is
# the conversation rate times the turns. Each run uses its own seed; within a run every router
# gets the same arrivals and prompts.
#
# Capacity: for each workload, measured once at the start of the invocation: a closed loop of
# 40 clients (10 per mock: every mock's 4 slots busy and a queue behind them) through Fulcrum
# least_connections on a fresh fleet, --capacity-seconds long; completions a second after the
# first 3 s are the capacity. That is the fleet's throughput with least_connections' cache hits;
# a router that hits the cache more has more headroom at the same offered rate. --capacity
# skips the measurement.
#
# Order: run, then workload, then load, then router (the routers' order rotated from cell to
# cell), so noise on this shared machine falls on every router alike.
#
# Reported per cell and router (client side, from the moment a request is sent): TTFT p50 and
# p99, end-to-end p99, the prefix-cache hit rate (the mocks' vllm:prefix_cache_hits_total over
# vllm:prefix_cache_queries_total, prompt tokens), errors (non-200, cut streams, timeouts), and
# the requests each mock served. The markdown gives, per cell, the median of the runs and their
# min-max, and whether predicted_ttft meets issue P1.2's targets against the medians: TTFT p99
# below every peer's, TTFT p50 at most 10% above the best peer's, hit rate at least the best
# peer's minus 1 point, no error. All records go to --out (JSON); the section replaces the
# ai-bench section of bench/RESULTS.md (unless --no-write).
#
# Usage: bench/ai-routing/run.sh [--runs 3] [--seconds 20] [--loads "50 80 95"]
#          [--workloads "chat shared groups"] [--routers "ptt pa lc smg vllm"]
#          [--capacity chat=R,shared=R,groups=R] [--capacity-seconds 15]
#          [--out bench/ai-routing/results.json] [--no-write]
# Smoke run: bench/ai-routing/run.sh --runs 1 --seconds 8 --capacity-seconds 8 --no-write
# The full run (3 runs x 3 workloads x 3 loads x 5 routers, 20 s cells) takes about 65 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
ARGS=; [ $# -gt 0 ] && { ARGS=$(printf "%q " "$@"); ARGS=${ARGS% }; }
RUNS=3
DURATION=20
LOADS="50 80 95"
WORKLOADS="chat shared groups"
ROUTERS="ptt pa lc smg vllm"
CAPACITY=""
CAP_SECONDS=15
OUT=$ROOT/bench/ai-routing/results.json
WRITE=1
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --seconds) DURATION=$2; shift 2 ;;
    --loads) LOADS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --routers) ROUTERS=$2; shift 2 ;;
    --capacity) CAPACITY=$2; shift 2 ;;
    --capacity-seconds) CAP_SECONDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-write) WRITE=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d /tmp/fulcrum-ai-bench.XXXXXX)
PIDS=()
stop_pid() { # SIGTERM, then SIGKILL after 5 s; reaps it
  local p=$1
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
stop_all() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && stop_pid "$p"; done
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT

PY=$(command -v python3)
BIN=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
# `pip show` fails for a package that is not installed: not an error here (pipefail).
SMG_VER=$("$PY" -m pip show smg 2>/dev/null | awk '/^Version/ {print $2}' || true)
VLR_VER=$("$PY" -m pip show vllm-router 2>/dev/null | awk '/^Version/ {print $2}' || true)
if ! "$PY" -c "import aiohttp" 2>/dev/null || [[ $SMG_VER != 1.13.* ]] || [ "$VLR_VER" != 0.1.17 ] \
  || [ ! -x "$BIN/smg" ] || [ ! -x "$BIN/vllm-router" ]; then
  echo "== installing smg 1.13, vllm-router 0.1.17 and aiohttp (PyPI)"
  "$PY" -m pip install --quiet --disable-pip-version-check "smg==1.13.*" "vllm-router==0.1.17" aiohttp
  SMG_VER=$("$PY" -m pip show smg 2>/dev/null | awk '/^Version/ {print $2}')
  VLR_VER=$("$PY" -m pip show vllm-router 2>/dev/null | awk '/^Version/ {print $2}')
fi
echo "== building fulcrum (release)"
cargo build --release --locked -q -p fulcrum
FULCRUM=${CARGO_TARGET_DIR:-$ROOT/target}/release/fulcrum

SPEEDS=(1 1 0.5 2)
SLOTS=4
BLOCKS=1000
BASE=19300
ROUTER_PORT=19400
METRICS_PORT=19401

router_name() {
  case $1 in
    ptt) echo "fulcrum predicted_ttft" ;;
    pa) echo "fulcrum prefix_affinity" ;;
    lc) echo "fulcrum least_connections" ;;
    smg) echo "smg cache_aware" ;;
    vllm) echo "vllm-router cache_aware" ;;
    *) echo "unknown router $1" >&2; exit 2 ;;
  esac
}
workload_args() {
  case $1 in
    chat) echo "--system-prompts 4" ;;
    shared) echo "--system-prompts 1" ;;
    groups) echo "--system-prompts 16" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}
COMMON="--turns 4 --think-ms 200 --system-tokens 1500 --user-tokens 60 --max-tokens 32 --timeout 60"

wait_http() {
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 1 "$1" && return 0
    sleep 0.1
  done
  echo "$1 did not answer" >&2; return 1
}

start_fleet() {
  for i in "${!SPEEDS[@]}"; do
    "$FULCRUM" mock-backend --port $((BASE + i)) --model llama --gpu h100 --speed "${SPEEDS[$i]}" \
      --max-num-seqs $SLOTS --itl-base-ms 16 --num-gpu-blocks $BLOCKS --seed $((i + 1)) 2>>"$WORK/mocks.log" &
    PIDS+=($!)
  done
  for i in "${!SPEEDS[@]}"; do wait_http "http://127.0.0.1:$((BASE + i))/health"; done
}

urls() { for i in "${!SPEEDS[@]}"; do printf 'http://127.0.0.1:%d ' $((BASE + i)); done; }

ROUTER_PID=
start_router() { # key
  local key=$1 policy
  : >"$WORK/router.log"
  case $key in
    ptt|pa|lc)
      case $key in ptt) policy=predicted_ttft ;; pa) policy=prefix_affinity ;; lc) policy=least_connections ;; esac
      {
        echo "[proxy]"; echo "workers = 1"
        echo "[[listener]]"; echo "name = \"public\""; echo "address = \"127.0.0.1:$ROUTER_PORT\""; echo "pool = \"fleet\""
        echo "[pool.fleet]"; echo "policy = \"$policy\""
        echo "engine_metrics = { interval = \"200ms\" }"
        echo "endpoints = ["
        for i in "${!SPEEDS[@]}"; do echo "  { address = \"127.0.0.1:$((BASE + i))\" },"; done
        echo "]"
      } > "$WORK/fulcrum.toml"
      "$FULCRUM" serve -c "$WORK/fulcrum.toml" 2>>"$WORK/router.log" &
      ;;
    smg)
      # shellcheck disable=SC2046
      "$BIN/smg" launch --worker-urls $(urls) --policy cache_aware --host 127.0.0.1 --port $ROUTER_PORT \
        --prometheus-host 127.0.0.1 --prometheus-port $METRICS_PORT --shutdown-grace-period-secs 1 \
        --log-level warn >>"$WORK/router.log" 2>&1 &
      ;;
    vllm)
      # shellcheck disable=SC2046
      "$BIN/vllm-router" --worker-urls $(urls) --policy cache_aware --host 127.0.0.1 --port $ROUTER_PORT \
        --prometheus-host 127.0.0.1 --prometheus-port $METRICS_PORT --log-level warning >>"$WORK/router.log" 2>&1 &
      ;;
  esac
  ROUTER_PID=$!
  PIDS+=($ROUTER_PID)
  # Ready when a request goes through.
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$ROUTER_PORT/v1/chat/completions" \
      -H 'content-type: application/json' -d '{"model":"llama","max_tokens":1,"messages":[{"role":"user","content":"ping"}]}' \
      | grep -q 200 && return 0
    kill -0 "$ROUTER_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "router $key did not become ready; log:" >&2; tail -20 "$WORK/router.log" >&2; return 1
}

cpu_ticks() { # utime + stime of a process, in clock ticks
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo $(( ${12} + ${13} ))
}
HZ=$(getconf CLK_TCK)

# --- capacity -------------------------------------------------------------------------------
declare -A CAP
if [ -n "$CAPACITY" ]; then
  IFS=',' read -ra kvs <<<"$CAPACITY"
  for kv in "${kvs[@]}"; do CAP[${kv%%=*}]=${kv#*=}; done
fi
for wl in $WORKLOADS; do
  [ -n "${CAP[$wl]:-}" ] && continue
  echo "== capacity of the fleet on $wl (closed loop, 40 clients, fulcrum least_connections, ${CAP_SECONDS}s)"
  start_fleet
  start_router lc
  # shellcheck disable=SC2046
  out=$(timeout $((CAP_SECONDS + 120)) "$PY" "$ROOT/bench/ai-routing/workload.py" --url "http://127.0.0.1:$ROUTER_PORT" \
    --mode closed --concurrency $((10 * ${#SPEEDS[@]})) --seconds "$CAP_SECONDS" --warmup 3 --seed 99 \
    $COMMON $(workload_args "$wl"))
  stop_all
  CAP[$wl]=$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["saturated_req_per_s"])')
  echo "   $wl: ${CAP[$wl]} req/s ($out)"
done

# --- the cells ------------------------------------------------------------------------------
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
read -ra RLIST <<<"$ROUTERS"
START=$(date +%s)
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
cellno=0
for run in $(seq 1 "$RUNS"); do
  for wl in $WORKLOADS; do
    for load in $LOADS; do
      rate=$("$PY" -c "print(round(${CAP[$wl]} * $load / 100, 2))")
      n=${#RLIST[@]}
      for k in $(seq 0 $((n - 1))); do
        key=${RLIST[$(((k + cellno) % n))]}
        name=$(router_name "$key")
        start_fleet
        if ! start_router "$key"; then
          stop_all
          echo "{\"run\": $run, \"workload\": \"$wl\", \"load\": $load, \"router\": \"$name\", \"offered_req_per_s\": $rate, \"requests\": 0, \"failed\": -1, \"failures\": {\"router_did_not_start\": 1}, \"ttft_p50_ms\": 0, \"ttft_p99_ms\": 0, \"e2e_p99_ms\": 0, \"hit_rate\": 0, \"per_backend\": [$(printf '0,%.0s' "${SPEEDS[@]}" | sed 's/,$//')]}" >>"$RESULTS"
          continue
        fi
        "$PY" "$ROOT/bench/ai-routing/report.py" snapshot $BASE ${#SPEEDS[@]} >"$WORK/before.json"
        t0=$(cpu_ticks "$ROUTER_PID")
        # shellcheck disable=SC2046
        timeout $((DURATION + 180)) "$PY" "$ROOT/bench/ai-routing/workload.py" --url "http://127.0.0.1:$ROUTER_PORT" \
          --mode open --rate "$rate" --seconds "$DURATION" --seed "$run" $COMMON $(workload_args "$wl") \
          >"$WORK/workload.json" 2>>"$WORK/workload.log" || true
        t1=$(cpu_ticks "$ROUTER_PID")
        alive=true; kill -0 "$ROUTER_PID" 2>/dev/null || alive=false
        "$PY" "$ROOT/bench/ai-routing/report.py" snapshot $BASE ${#SPEEDS[@]} >"$WORK/after.json"
        stop_all
        rec=$("$PY" "$ROOT/bench/ai-routing/report.py" cell "$WORK/workload.json" "$WORK/before.json" "$WORK/after.json" \
          run="$run" workload="\"$wl\"" load="$load" router="\"$name\"" \
          router_cpu_s="$("$PY" -c "print(round(($t1 - $t0) / $HZ, 2))")" router_alive_at_end="$alive")
        echo "$rec" >>"$RESULTS"
        echo "$rec" | "$PY" "$ROOT/bench/ai-routing/report.py" line
      done
      cellno=$((cellno + 1))
    done
  done
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_END=$(cut -d" " -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------
CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
# The routing code: the last commit that changed the Rust sources.
COMMIT=$(git -C "$ROOT" log -1 --format=%h -- crates Cargo.toml Cargo.lock 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null | head -1)
[ -n "$DIRTY" ] && COMMIT="$COMMIT (crates/ modified)"
NAMES=$(for k in "${RLIST[@]}"; do printf '"%s",' "$(router_name "$k")"; done | sed 's/,$//')
CAPS=$(for wl in $WORKLOADS; do printf '"%s": %s,' "$wl" "${CAP[$wl]}"; done | sed 's/,$//')
cat >"$WORK/meta.json" <<JSON
{"date": "$(date -u +%Y-%m-%dT%H:%MZ)", "machine": "$CPU, $(nproc) cores", "commit": "$COMMIT",
 "command": $(printf '%s' "bench/ai-routing/run.sh $ARGS" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))'), "loadavg_start": "$LOAD_START", "loadavg_end": "$LOAD_END", "runs": $RUNS, "seconds": $DURATION, "elapsed_s": $ELAPSED,
 "smg": "$SMG_VER", "vllm_router": "$VLR_VER",
 "fleet": {"speeds": [$(IFS=,; echo "${SPEEDS[*]}")], "max_num_seqs": $SLOTS, "num_gpu_blocks": $BLOCKS, "itl_base_ms": 16, "gpu": "h100"},
 "workloads": [$(for wl in $WORKLOADS; do printf '"%s",' "$wl"; done | sed 's/,$//')],
 "loads": [$(echo "$LOADS" | tr ' ' ',')], "capacity_req_per_s": {$CAPS}, "routers": [$NAMES]}
JSON
"$PY" - "$WORK/meta.json" "$RESULTS" "$OUT" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
meta["results"] = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
json.dump(meta, open(sys.argv[3], "w"), indent=1)
PY
echo "== all records: $OUT"
"$PY" "$ROOT/bench/ai-routing/report.py" table "$RESULTS" "$WORK/meta.json" "$WORK/table.md"
CAPTXT=$(for wl in $WORKLOADS; do printf '%s %s, ' "$wl" "${CAP[$wl]}"; done | sed 's/, $//')
{
  echo "<!-- ai-bench:start -->"
  echo "Date: $(date -u +%Y-%m-%d), machine: $CPU, $(nproc) cores; routing code at commit $COMMIT."
  echo "Command: \`bench/ai-routing/run.sh${ARGS:+ $ARGS}\` ($RUNS run(s), ${DURATION} s of arrivals a cell, $((ELAPSED / 60)) min in all;"
  echo "load average $LOAD_START at the start, $LOAD_END at the end)."
  echo "Peers: smg $SMG_VER (\`smg launch --policy cache_aware\`), vllm-router $VLR_VER (\`--policy cache_aware\`), both"
  echo "with their defaults otherwise; Fulcrum's pools have \`engine_metrics\` (200 ms) and endpoints without weight or labels."
  echo "Fleet: 4 mocks, speeds ${SPEEDS[*]} (told to no router), $SLOTS batch slots, $BLOCKS KV blocks each."
  echo "Capacity (closed loop through least_connections, req/s): $CAPTXT. Cells: median of the runs (min-max)."
  echo
  cat "$WORK/table.md"
  echo "<!-- ai-bench:end -->"
} > "$WORK/section.md"
cat "$WORK/section.md"
if [ "$WRITE" = 1 ] && grep -q "<!-- ai-bench:start -->" "$ROOT/bench/RESULTS.md"; then
  "$PY" - "$ROOT/bench/RESULTS.md" "$WORK/section.md" <<'PY'
import re, sys
path, section = sys.argv[1], open(sys.argv[2]).read().strip()
text = open(path).read()
text = re.sub(r"<!-- ai-bench:start -->.*?<!-- ai-bench:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
  echo "== updated bench/RESULTS.md"
fi
