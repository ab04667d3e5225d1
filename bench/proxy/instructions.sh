#!/usr/bin/env bash
# Proxy cost as an exact count, for changes too small for bench/proxy/run.sh's wall clock.
#
# What it does: the setup of bench/proxy/run.sh (one NGINX backend worker serving two upstream
# ports on 127.0.0.1, each proxy with one worker thread balancing them round robin, wrk -t1 on
# loopback), but each proxy runs under `valgrind --tool=cachegrind`, and wrk stops itself after
# a fixed number of responses (REQUESTS). Contestants: Fulcrum (this tree's release build, or
# NEW), the baseline Fulcrum (BASELINE, optional) and HAProxy (Debian's package).
#   - For every contestant, REPEATS times: one startup-only run (start under cachegrind, wait
#     for the port, stop) and, at each connection count, one load run.
#   - Requests are counted at the backend (its access log, one line a forwarded request), so
#     the requests wrk had in flight when it stopped are counted too.
#   - Per request: (instructions of the load run - instructions of the startup-only run of the
#     same repeat) / requests; the same for cachegrind's simulated I1 misses (I1 32 KiB, 8-way,
#     64 B lines, set explicitly so that another machine simulates the same cache).
#   - Printed: a table of the means (range over the repeats) and the ratios Fulcrum / baseline,
#     Fulcrum / HAProxy and baseline / HAProxy. The cachegrind files stay in OUT (default: a
#     new directory under /tmp, kept) for cg_annotate and cg_diff. Nothing is written into
#     bench/RESULTS.md: the tables are pasted by hand.
# These are user-space counts only: valgrind does not see the kernel, where most of a small
# request's proxy CPU goes. With PERF_SECONDS > 0 (the default), a second part runs each proxy
# natively (no valgrind) for PERF_SECONDS at each connection count under `perf record -e
# cpu-clock` (a software clock: guests often have no hardware counters) and `perf stat -e
# raw_syscalls:sys_enter`, and prints the kernel's share of the samples (and of utime+stime from
# /proc) and the system calls per request. It then turns the instruction ratio into an estimate
# of the CPU-per-request ratio: user share x instruction ratio + kernel share x 1, taking the
# kernel's time per request as unchanged when the system calls per request are the same, and a
# user-space instruction as taking the same time in both builds (the I1 misses tell whether it
# may not). That estimate is for two builds of the same program; against HAProxy, whose code is
# another, the instruction ratio is only an instruction ratio.
#
# Bounds: every wrk run has a time limit (WRK_LIMIT seconds, default 300), every proxy is given
# 60 s to exit after SIGTERM and is then killed; only 127.0.0.1 is used, on ports PORT..PORT+2
# (default 18180-18182; the script stops if one is taken). It stops only the processes it
# started, by PID. A run with the defaults and a baseline takes about 10 minutes on a 2-core guest.
#
# Usage: [NEW=path/to/fulcrum] [BASELINE=path/to/fulcrum] [REQUESTS=40000] [REPEATS=2]
#        [PERF_SECONDS=10] [PORT=18180] [OUT=dir] bench/proxy/instructions.sh [connection counts, default "32 256"]
# Without NEW, the script builds this tree (`cargo build --release --locked -p fulcrum`).
# Needs: valgrind, haproxy, nginx, wrk (installed with apt if missing), perf for the second part.
set -euo pipefail
# Resolve paths given relative to the caller before leaving its directory.
NEW=${NEW:-}; BASELINE=${BASELINE:-}
for v in NEW BASELINE; do
  if [ -n "${!v}" ]; then
    p=$(realpath "${!v}")
    [ -x "$p" ] || { echo "$v=${!v} is not an executable file" >&2; exit 1; }
    printf -v "$v" '%s' "$p"
  fi
done
OUT=${OUT:-}
if [ -n "$OUT" ]; then mkdir -p "$OUT"; OUT=$(realpath "$OUT"); fi
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
CONNS=${1:-"32 256"}
REQUESTS=${REQUESTS:-40000}
REPEATS=${REPEATS:-2}
PERF_SECONDS=${PERF_SECONDS:-10}
WRK_LIMIT=${WRK_LIMIT:-300}
PORT=${PORT:-18180}
LB=$PORT; B1=$((PORT + 1)); B2=$((PORT + 2))
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/fulcrum-instructions.XXXXXX)
WORK=$(mktemp -d /tmp/fulcrum-instructions-work.XXXXXX)
BACKEND_PID=; LB_PID=; WRK_PID=
cleanup() {
  # Only what this script started and has not yet seen exit.
  for p in $WRK_PID $LB_PID $BACKEND_PID; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx || ! need wrk || ! need valgrind; then
  echo "== installing haproxy, nginx, wrk and valgrind (Debian packages)"
  # Keep the packages' services from starting on their own.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx wrk valgrind >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
if [ "$PERF_SECONDS" != 0 ] && ! need perf; then
  echo "perf not found (Debian: linux-perf); run with PERF_SECONDS=0 for the counts alone" >&2; exit 1
fi

if [ -z "$NEW" ]; then
  echo "== building fulcrum (release)"
  cargo build --release --locked -q -p fulcrum
  NEW=$ROOT/target/release/fulcrum
fi

for p in $LB $B1 $B2; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p on 127.0.0.1 is taken: choose another block with PORT=" >&2; exit 1
  fi
done

# The backend and the proxies as every proxy benchmark runs them (bench/proxy/configs.sh);
# here the backend logs one line a request: the count of requests the proxy forwarded.
source "$ROOT/bench/proxy/configs.sh"
write_configs "log_format one '\$status';
  access_log $WORK/access.log one;"

# wrk stops its (single) thread after REQUESTS responses and leaves a file saying so; its main
# thread would sleep out the whole -d, so the script then ends it with SIGINT (wrk prints its
# figures on SIGINT).
cat > "$WORK/stop.lua" <<'LUA'
local limit = tonumber(os.getenv("INSTRUCTIONS_REQUESTS"))
local marker = os.getenv("INSTRUCTIONS_DONE")
local seen = 0
function response(status, headers, body)
  seen = seen + 1
  if seen == limit then
    io.open(marker, "w"):close()
    wrk.thread:stop()
  end
end
LUA

wait_port() { # port [tries of 0.1 s]
  for _ in $(seq 1 "${2:-600}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2; return 1
}
logged() { wc -l < "$WORK/access.log"; }
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

taskset -c 1 nginx -c "$WORK/backend.conf" & BACKEND_PID=$!
wait_port $B1; wait_port $B2

binary() { case $1 in fulcrum) echo "$NEW" ;; baseline) echo "$BASELINE" ;; esac; }
label() { case $1 in fulcrum) echo "fulcrum" ;; baseline) echo "fulcrum (baseline)" ;; haproxy) echo "haproxy" ;; esac; }
start() { # name, then the command's prefix (valgrind ... or nothing)
  local name=$1; shift
  case $name in
    fulcrum|baseline) taskset -c 0 "$@" "$(binary "$name")" serve -c "$WORK/fulcrum.toml" 2>>"$WORK/$name.log" & ;;
    haproxy) taskset -c 0 "$@" haproxy -f "$WORK/haproxy.cfg" -db 2>>"$WORK/$name.log" & ;;
  esac
  LB_PID=$!
  wait_port $LB
}
stop() {
  kill -TERM "$LB_PID"
  for _ in $(seq 1 600); do kill -0 "$LB_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$LB_PID" 2>/dev/null; then
    echo "$LB_PID did not exit within 60 s of SIGTERM: killed" >&2
    kill -KILL "$LB_PID" 2>/dev/null || true
  fi
  wait "$LB_PID" 2>/dev/null || true
  LB_PID=
}

LBS="fulcrum haproxy"
if [ -n "$BASELINE" ]; then LBS="fulcrum baseline haproxy"; fi

# Part 1: cachegrind.
SUMMARY=$OUT/summary.tsv
printf 'proxy\trepeat\tconnections\trequests\twrk_requests\tIr\tI1mr\n' > "$SUMMARY"
cg_run() { # name repeat connections (0: startup only)
  local name=$1 rep=$2 c=$3 f="$OUT/cachegrind.$1.$2.$3"
  start "$name" valgrind --tool=cachegrind --cache-sim=yes --branch-sim=no \
    --I1=32768,8,64 --D1=32768,8,64 --LL=33554432,16,64 --cachegrind-out-file="$f"
  sleep 1
  local before after wrk_reqs=0
  before=$(logged)
  if [ "$c" != 0 ]; then
    rm -f "$WORK/done"
    INSTRUCTIONS_REQUESTS=$REQUESTS INSTRUCTIONS_DONE=$WORK/done taskset -c 1 \
      wrk -t1 -c"$c" -d"${WRK_LIMIT}s" -s "$WORK/stop.lua" "http://127.0.0.1:$LB/" > "$f.wrk" &
    WRK_PID=$!
    while kill -0 "$WRK_PID" 2>/dev/null && [ ! -e "$WORK/done" ]; do sleep 0.1; done
    kill -INT "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" || true
    WRK_PID=
    wrk_reqs=$(awk '/requests in/ {print $1}' "$f.wrk")
    sleep 1
  fi
  stop
  after=$(logged)
  [ -s "$f" ] || { echo "no cachegrind output from $(label "$name") (see $WORK/$name.log)" >&2; exit 1; }
  local ir i1
  # summary: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw
  ir=$(awk '/^summary:/ {print $2}' "$f"); i1=$(awk '/^summary:/ {print $3}' "$f")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rep" "$c" "$((after - before))" "$wrk_reqs" "$ir" "$i1" >> "$SUMMARY"
  echo "  $(label "$name") repeat $rep, c=$c: $((after - before)) requests forwarded ($wrk_reqs answered to wrk), $ir instructions, $i1 I1 misses"
}
for rep in $(seq 1 "$REPEATS"); do
  for lb in $LBS; do
    echo "== repeat $rep of $REPEATS: $(label "$lb") under cachegrind"
    cg_run "$lb" "$rep" 0
    for c in $CONNS; do cg_run "$lb" "$rep" "$c"; done
  done
done

# Part 2: perf, natively.
PERF=$OUT/perf.tsv
printf 'proxy\tconnections\trequests\tkernel_samples_pct\tutime_ticks\tstime_ticks\tsyscalls\n' > "$PERF"
if [ "$PERF_SECONDS" != 0 ]; then
  for lb in $LBS; do
    echo "== $(label "$lb") natively under perf"
    start "$lb"
    sleep 0.5
    for c in $CONNS; do
      taskset -c 1 wrk -t1 -c"$c" -d2s "http://127.0.0.1:$LB/" > /dev/null
      f="$OUT/perf.$lb.$c"
      before=$(logged); read -r u0 s0 < <(cpu_ticks "$LB_PID")
      perf record -q -e cpu-clock -o "$f.data" -p "$LB_PID" -- sleep "$PERF_SECONDS" 2>/dev/null &
      rec=$!
      perf stat -x, -e raw_syscalls:sys_enter -o "$f.stat" -p "$LB_PID" -- sleep "$PERF_SECONDS" 2>/dev/null &
      st=$!
      taskset -c 1 wrk -t1 -c"$c" -d"${PERF_SECONDS}s" "http://127.0.0.1:$LB/" > "$f.wrk"
      wait "$rec" "$st" || true
      after=$(logged); read -r u1 s1 < <(cpu_ticks "$LB_PID")
      # Kernel share: the samples whose symbol perf marks [k].
      kpct=$(perf report -i "$f.data" --stdio -q --sort sym 2>/dev/null |
        awk '$2 == "[k]" {k += $1} $2 == "[.]" {u += $1} END {printf "%.1f", 100 * k / (k + u)}')
      sys=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$f.stat")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$lb" "$c" "$((after - before))" "$kpct" "$((u1 - u0))" "$((s1 - s0))" "$sys" >> "$PERF"
      echo "  $(label "$lb") c=$c: $((after - before)) requests, kernel ${kpct}% of samples, utime/stime $((u1 - u0))/$((s1 - s0)) ticks, $sys system calls"
    done
    stop
  done
fi

python3 - "$SUMMARY" "$PERF" "$LBS" "$CONNS" <<'PY'
import csv, sys
summary, perf, lbs, conns = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
label = {"fulcrum": "fulcrum", "baseline": "fulcrum (baseline)", "haproxy": "haproxy"}
rows = list(csv.DictReader(open(summary), delimiter="\t"))
startup = {(r["proxy"], r["repeat"]): r for r in rows if r["connections"] == "0"}
per = {}  # (proxy, c) -> [(ir per request, i1 per request, requests)]
for r in rows:
    if r["connections"] == "0":
        continue
    s = startup[(r["proxy"], r["repeat"])]
    n = int(r["requests"])
    per.setdefault((r["proxy"], r["connections"]), []).append(
        ((int(r["Ir"]) - int(s["Ir"])) / n, (int(r["I1mr"]) - int(s["I1mr"])) / n, n))
mean = lambda xs: sum(xs) / len(xs)
def cell(xs, d=0):
    m = mean(xs)
    return f"{m:,.{d}f} ({min(xs):,.{d}f}-{max(xs):,.{d}f})" if len(xs) > 1 else f"{m:,.{d}f}"
print()
print("| proxy | connections | requests a run | user-space instructions per request | simulated I1 misses per request |")
print("| --- | ---: | ---: | ---: | ---: |")
for lb in lbs:
    for c in conns:
        v = per[(lb, c)]
        print(f"| {label[lb]} | {c} | {', '.join(f'{x[2]:,}' for x in v)} | {cell([x[0] for x in v])} | {cell([x[1] for x in v])} |")
pairs = [("fulcrum", "baseline", "Fulcrum / baseline"), ("fulcrum", "haproxy", "Fulcrum / HAProxy"),
         ("baseline", "haproxy", "baseline / HAProxy")]
pairs = [p for p in pairs if p[0] in lbs and p[1] in lbs]
ratio = {}
print()
print("| ratio | connections | instructions per request | I1 misses per request |")
print("| --- | ---: | ---: | ---: |")
for a, b, title in pairs:
    for c in conns:
        ir = mean([x[0] for x in per[(a, c)]]) / mean([x[0] for x in per[(b, c)]])
        i1 = mean([x[1] for x in per[(a, c)]]) / mean([x[1] for x in per[(b, c)]])
        ratio[(a, b, c)] = ir
        d = mean([x[0] for x in per[(a, c)]]) - mean([x[0] for x in per[(b, c)]])
        print(f"| {title} | {c} | {ir:.3f}x ({d:+,.0f}) | {i1:.3f}x |")
prow = list(csv.DictReader(open(perf), delimiter="\t"))
if prow:
    print()
    print("| proxy (native, perf) | connections | requests | kernel share of cpu-clock samples | kernel share of utime+stime | system calls per request |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    share, calls = {}, {}
    for r in prow:
        n = int(r["requests"])
        u, s = int(r["utime_ticks"]), int(r["stime_ticks"])
        share[(r["proxy"], r["connections"])] = float(r["kernel_samples_pct"]) / 100
        calls[(r["proxy"], r["connections"])] = int(r["syscalls"]) / n
        print(f"| {label[r['proxy']]} | {r['connections']} | {n:,} | {r['kernel_samples_pct']}% | "
              f"{100 * s / (u + s):.1f}% | {int(r['syscalls']) / n:.2f} |")
    if "baseline" in lbs:
        print()
        print("Estimated CPU per request, Fulcrum / baseline = (1 - k) x instruction ratio + k x 1,")
        print("with k the baseline's kernel share of the samples (its kernel time per request taken as")
        print("unchanged: compare the system calls per request above):")
        for c in conns:
            k = share[("baseline", c)]
            r = ratio[("fulcrum", "baseline", c)]
            print(f"  {c} connections: k = {k:.2f}, (1 - {k:.2f}) x {r:.3f} + {k:.2f} = {(1 - k) * r + k:.3f}x")
PY
echo
echo "== cachegrind files, wrk and perf output: $OUT (summary.tsv, perf.tsv)"
