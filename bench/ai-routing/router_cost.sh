#!/usr/bin/env bash
# Router cost with long prompts: 200 KB chat bodies through Fulcrum's prefix_affinity policy
# on one worker thread (pinned to CPU 0), two NGINX upstreams answering at once, wrk on CPU 1.
# Every request is parsed (model, every message, token estimate), cut into chained prefix
# block hashes, looked up in the prefix index and recorded. Target (issue P1.5): at least
# 2,000 requests/s on one core. The figures replace the router-cost section of
# bench/RESULTS.md.
#
# Usage: bench/ai-routing/router_cost.sh [seconds, default 10]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DURATION=${1:-10}
WORK=$(mktemp -d /tmp/fulcrum-cost.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
command -v nginx >/dev/null && command -v wrk >/dev/null || {
  created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created=1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx wrk >/dev/null
  [ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d
}
cargo build --release --locked -q -p fulcrum
B1=18581; B2=18582; LB=18580

python3 - "$WORK/body.json" <<'PY'
import json, random, sys
rng = random.Random(1)
words = "model cache token prefix stream batch router fleet latency request answer".split()
def text(n):
    return " ".join(rng.choice(words) for _ in range(n))
messages = [{"role": "system", "content": text(9000)}]
for i in range(8):
    messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text(2500)})
body = {"model": "llama", "max_tokens": 64, "stream": False, "messages": messages}
raw = json.dumps(body)
open(sys.argv[1], "w").write(raw)
print(f"body: {len(raw)} bytes, {len(messages)} messages", file=sys.stderr)
PY
BYTES=$(stat -c %s "$WORK/body.json")

cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_max_body_size 8m;
  client_body_buffer_size 1m;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 '{"choices":[]}'; } }
  server { listen 127.0.0.1:$B2; location / { return 200 '{"choices":[]}'; } }
}
CONF
cat > "$WORK/fulcrum.toml" <<CONF
[proxy]
workers = 1
[[listener]]
name = "public"
address = "127.0.0.1:$LB"
pool = "llm"
[pool.llm]
policy = "prefix_affinity"
endpoints = [{ address = "127.0.0.1:$B1" }, { address = "127.0.0.1:$B2" }]
CONF
cat > "$WORK/post.lua" <<LUA
local f = io.open("$WORK/body.json", "r")
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
LUA

wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
taskset -c 1 nginx -c "$WORK/nginx.conf" & PIDS+=($!)
wait_port $B1
taskset -c 0 "$ROOT/target/release/fulcrum" serve -c "$WORK/fulcrum.toml" 2>"$WORK/fulcrum.log" & FP=$!; PIDS+=($FP)
wait_port $LB
taskset -c 1 wrk -t1 -c16 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$LB/v1/chat/completions" >/dev/null
t0=$(awk '{print $14 + $15}' /proc/$FP/stat)
OUT=$(taskset -c 1 wrk -t1 -c16 -d"${DURATION}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$LB/v1/chat/completions")
t1=$(awk '{print $14 + $15}' /proc/$FP/stat)
REQS=$(echo "$OUT" | awk '/requests in/ {print $1}')
RPS=$(echo "$OUT" | awk '/Requests\/sec/ {print $2}')
P50=$(echo "$OUT" | awk '$1=="50%" {print $2}')
P99=$(echo "$OUT" | awk '$1=="99%" {print $2}')
NON2XX=$(echo "$OUT" | awk '/Non-2xx/ {print $4}')
CPU_US=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v r="$REQS" 'BEGIN { printf "%.0f", d / hz * 1e6 / r }')
CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
SECTION="<!-- router-cost:start -->
Date: $(date -u +%Y-%m-%d), machine: $CPU, $(nproc) cores. Command: \`bench/ai-routing/router_cost.sh $DURATION\`
(body: $BYTES bytes of chat, 9 messages; prefix_affinity, one worker thread on CPU 0; wrk -t1 -c16 and NGINX on CPU 1).

| requests/s | p50 | p99 | proxy CPU per request | non-2xx |
| ---: | ---: | ---: | ---: | ---: |
| $RPS | $P50 | $P99 | ${CPU_US} µs | ${NON2XX:-0} |
<!-- router-cost:end -->"
echo "$SECTION"
python3 - "$ROOT/bench/RESULTS.md" "$SECTION" <<'PY'
import re, sys
path, section = sys.argv[1], sys.argv[2]
text = open(path).read()
if "<!-- router-cost:start -->" in text:
    text = re.sub(r"<!-- router-cost:start -->.*?<!-- router-cost:end -->", lambda _: section, text, flags=re.S)
    open(path, "w").write(text)
PY
