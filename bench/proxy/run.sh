#!/usr/bin/env bash
# Side-by-side HTTP proxy benchmark on loopback, in one run:
#   the backend directly, Fulcrum, HAProxy 2.6 and NGINX 1.22 (Debian packages), each proxy
#   with one worker thread balancing two keep-alive upstreams round robin.
# Each proxy runs pinned to CPU 0; wrk and the backend (one NGINX worker serving both
# upstream ports) share CPU 1. Reported: requests/s, p50/p99 latency (wrk), the proxy's CPU
# time per request (utime+stime over the run / requests), and its idle RSS.
# The proxies take turns, round after round (ROUNDS, default 3), so that a noisy stretch of a
# shared machine hits each of them; the table gives each figure's median over the rounds and
# the ratios of Fulcrum's to HAProxy's. It replaces the "proxy" section of bench/RESULTS.md.
# BASELINE=path/to/another/fulcrum adds that binary as one more contestant, "fulcrum (baseline)",
# taking its turn in every round right after Fulcrum, so that a change to Fulcrum can be judged
# against the build before it in the same run (the machine's noise moves both alike); the
# ratios then include the baseline's to HAProxy's and Fulcrum's to the baseline's. Such a run
# only prints its section: the "proxy" section of bench/RESULTS.md stays the plain comparison.
#
# TLS=1 measures TLS termination instead: each proxy serves HTTPS on its port (one ECDSA P-256
# certificate, TLS 1.3, see configs.sh) to plain upstreams, and each also gets a run at 32
# connections where every request opens a new connection (`Connection: close`: a full
# handshake each, which is what the CPU per request then mostly is). Its section is "proxy-tls".
#
# Usage: [ROUNDS=3] [BASELINE=path] [TLS=1] bench/proxy/run.sh [seconds per run, default 10] [connection counts, default "32 256"]
set -euo pipefail
# Resolve the baseline before leaving the caller's directory, and fail before any building.
BASELINE=${BASELINE:-}
if [ -n "$BASELINE" ]; then
  BASELINE=$(realpath "$BASELINE")
  [ -x "$BASELINE" ] || { echo "BASELINE=$BASELINE is not an executable file" >&2; exit 1; }
fi
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
DURATION=${1:-10}
CONNS=${2:-"32 256"}
ROUNDS=${ROUNDS:-3}
WORK=$(mktemp -d /tmp/fulcrum-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk; then
  echo "== installing haproxy, nginx and wrk (Debian packages)"
  # Keep the packages' services from starting on their own.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx wrk >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

echo "== building fulcrum (release)"
cargo build --release --locked -q -p fulcrum
FULCRUM=$ROOT/target/release/fulcrum

# Free ports from the kernel's ephemeral range would race; use a fixed block on loopback.
B1=18081; B2=18082; LB=18080

# The backend and the proxies as every proxy benchmark runs them (bench/proxy/configs.sh).
source "$ROOT/bench/proxy/configs.sh"
write_configs

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2; return 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

taskset -c 1 nginx -c "$WORK/backend.conf" & PIDS+=($!)
wait_port $B1; wait_port $B2

SAMPLES=$WORK/samples.tsv
: > "$SAMPLES"
TLS=${TLS:-0}
run_wrk() { # name pid port conns [close]
  local name=$1 pid=$2 port=$3 c=$4 close=${5:-}
  local url="http://127.0.0.1:$port/"
  if [ "$TLS" = 1 ] && [ "$port" = "$LB" ]; then url="https://127.0.0.1:$port/"; fi
  local hdr=()
  if [ -n "$close" ]; then hdr=(-H "Connection: close"); fi
  # Warm up connections, then measure.
  taskset -c 1 wrk -t1 -c"$c" -d2s "${hdr[@]}" "$url" >/dev/null
  local t0; t0=$([ "$pid" != "-" ] && cpu_ticks "$pid" || echo 0)
  local out; out=$(taskset -c 1 wrk -t1 -c"$c" -d"${DURATION}s" --latency "${hdr[@]}" "$url")
  local t1; t1=$([ "$pid" != "-" ] && cpu_ticks "$pid" || echo 0)
  local reqs rps p50 p99 errs
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {printf "%s ", $0}')
  local cpu="-"
  if [ "$pid" != "-" ]; then
    local hz; hz=$(getconf CLK_TCK)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v r="$reqs" 'BEGIN { printf "%.1f", d / hz * 1e6 / r }')
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$rps" "$p50" "$p99" "$cpu" "${errs:-none}" >> "$SAMPLES"
  echo "  $name c=$c: $rps req/s, p50 $p50, p99 $p99, cpu/req ${cpu} us ${errs}"
}

start_lb() { # name
  case $1 in
    fulcrum) taskset -c 0 "$FULCRUM" serve -c "$WORK/fulcrum.toml" 2>"$WORK/fulcrum.log" & ;;
    # The same configuration: the baseline differs from Fulcrum only in its code.
    baseline) taskset -c 0 "$BASELINE" serve -c "$WORK/fulcrum.toml" 2>"$WORK/baseline.log" & ;;
    haproxy) taskset -c 0 haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" & ;;
    nginx) taskset -c 0 nginx -c "$WORK/nginx.conf" 2>"$WORK/nginx.log" & ;;
  esac
  LB_PID=$!
  PIDS+=("$LB_PID")
  wait_port $LB
}

# The contestants in turn order, and the name each has in the table.
LBS="fulcrum haproxy nginx"
if [ -n "$BASELINE" ]; then LBS="fulcrum baseline haproxy nginx"; fi
label() { if [ "$1" = baseline ]; then echo "fulcrum (baseline)"; else echo "$1"; fi; }

declare -A IDLE
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS: backend directly"
  for c in $CONNS; do run_wrk "backend (nginx, direct)" - $B1 "$c"; done
  for lb in $LBS; do
    echo "== round $round of $ROUNDS: $(label $lb)"
    start_lb $lb
    sleep 0.5
    # NGINX forks a worker: measure the worker (the child of the master).
    pid=$LB_PID
    if [ $lb = nginx ]; then pid=$(pgrep -P "$LB_PID" | head -1); fi
    [ "$round" = 1 ] && IDLE[$lb]=$(rss_kb "$pid")
    for c in $CONNS; do run_wrk "$(label $lb)" "$pid" $LB "$c"; done
    if [ "$TLS" = 1 ]; then run_wrk "$(label $lb) (new connection each request)" "$pid" $LB 32 close; fi
    kill "$LB_PID"; wait "$LB_PID" 2>/dev/null || true
    sleep 0.3
  done
done

# Medians per target and connection count, in the order first seen; then Fulcrum / HAProxy
# (and, with a baseline, the baseline / HAProxy and Fulcrum / baseline).
TABLE=$(python3 - "$SAMPLES" "$BASELINE" <<'PY'
import re, statistics, sys
baseline = sys.argv[2] != ""
rows = {}
for line in open(sys.argv[1]):
    name, c, rps, p50, p99, cpu, errs = line.rstrip("\n").split("\t")
    rows.setdefault((name, c), []).append((rps, p50, p99, cpu, errs))
def secs(t):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", t)
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else float("nan")
def fmt(s):
    return f"{s * 1e6:.0f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms"
med = {}
for (name, c), runs in rows.items():
    rps = statistics.median(float(r[0]) for r in runs)
    p50 = statistics.median(secs(r[1]) for r in runs)
    p99 = statistics.median(secs(r[2]) for r in runs)
    cpus = [float(r[3]) for r in runs if r[3] != "-"]
    cpu = statistics.median(cpus) if cpus else None
    errs = "; ".join(sorted({r[4] for r in runs if r[4] != "none"})) or "none"
    med[(name, c)] = (rps, p99, cpu, cpus)
    spread = f"{min(float(r[0]) for r in runs):.0f}-{max(float(r[0]) for r in runs):.0f}"
    print(f"| {name} | {c} | {rps:.0f} ({spread}) | {fmt(p50)} | {fmt(p99)} | {'-' if cpu is None else f'{cpu:.1f}'} | {errs} |")
# (numerator, denominator, title). Alone, the title heads the table as it always has; with
# a baseline, each row names its ratio.
pairs = [("fulcrum", "haproxy", "Fulcrum / HAProxy")]
if any(name.endswith("(new connection each request)") for name, _ in med):
    pairs.append(("fulcrum (new connection each request)", "haproxy (new connection each request)", "Fulcrum / HAProxy, new connections"))
if baseline:
    pairs += [("fulcrum (baseline)", "haproxy", "Fulcrum (baseline) / HAProxy"),
              ("fulcrum", "fulcrum (baseline)", "Fulcrum / baseline")]
print()
print("| ratio | connections | requests/s | p99 | CPU per request |")
print("| --- | ---: | ---: | ---: | ---: |")
for num, den, title in pairs:
    for (name, c), (rps, p99, cpu, cpus) in med.items():
        if name == num and (den, c) in med:
            h = med[(den, c)]
            ratio = f"{cpu / h[2]:.2f}x"
            # Two builds of the same proxy: also the range of the ratios taken round by round
            # (both ran within a minute of each other), a direct reading of the noise.
            if den == "fulcrum (baseline)" and len(cpus) == len(h[3]) > 1:
                per_round = [a / b for a, b in zip(cpus, h[3])]
                ratio += f" ({min(per_round):.2f}-{max(per_round):.2f} by round)"
            lead = f"| {title} |"
            print(f"{lead} {c} | {rps / h[0]:.2f}x | {p99 / h[1]:.2f}x | {ratio} |")
PY
)

CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
# A run with a baseline is pasted by hand beside the "proxy" section: no markers, or the next
# plain run would replace it too.
MARK=proxy-bench
if [ "$TLS" = 1 ]; then MARK=proxy-tls-bench; fi
{
  if [ -z "$BASELINE" ]; then echo "<!-- $MARK:start -->"; fi
  echo "Date: $(date -u +%Y-%m-%d), machine: $CPU, $(nproc) cores, $(uname -r)."
  echo "Command: \`ROUNDS=$ROUNDS ${BASELINE:+BASELINE=$BASELINE }$([ "$TLS" = 1 ] && echo "TLS=1 ")bench/proxy/run.sh $DURATION \"$CONNS\"\` (wrk -t1, ${DURATION} s a run after a 2 s warm-up;"
  echo "proxy pinned to CPU 0, wrk and the backend to CPU 1; body: 14 bytes). Medians of $ROUNDS rounds, the"
  echo "proxies taking turns in each; requests/s shows the range over the rounds."
  echo
  echo "| target | connections | requests/s | p50 | p99 | proxy CPU per request (µs) | errors |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
  echo "$TABLE"
  echo
  echo "Idle RSS after start: fulcrum $((IDLE[fulcrum] / 1024)) MiB ($((IDLE[fulcrum])) KiB),${BASELINE:+ baseline $((IDLE[baseline] / 1024)) MiB ($((IDLE[baseline])) KiB),} haproxy $((IDLE[haproxy] / 1024)) MiB, nginx worker $((IDLE[nginx] / 1024)) MiB."
  if [ -z "$BASELINE" ]; then echo "<!-- $MARK:end -->"; fi
} > "$WORK/section.md"
cat "$WORK/section.md"

RESULTS=$ROOT/bench/RESULTS.md
if [ -n "$BASELINE" ]; then
  echo "== run with a baseline: $RESULTS left as it is; section printed above"
elif grep -q "<!-- $MARK:start -->" "$RESULTS" 2>/dev/null; then
  python3 - "$RESULTS" "$WORK/section.md" "$MARK" <<'PY'
import re, sys
path, section, mark = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
text = open(path).read()
text = re.sub(rf"<!-- {mark}:start -->.*?<!-- {mark}:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
  echo "== updated $RESULTS"
else
  echo "== $RESULTS has no $MARK markers; section printed above"
fi
