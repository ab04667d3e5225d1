#!/usr/bin/env python3
"""Helpers of bench/ai-routing/run.sh.

  report.py snapshot BASE N            the mocks' counters (ports BASE..BASE+N-1) as JSON
  report.py cell WORKLOAD.json BEFORE.json AFTER.json KEY=VALUE...
                                       one result record (JSON line): the client's figures,
                                       the hit rate and per-backend requests from the counters'
                                       difference, and the KEY=VALUE fields given
  report.py line < RECORD              one line for the console
  report.py retable RESULTS.json OUT.md the same from run.sh's --out file
  report.py table RESULTS.jsonl META.json OUT.md
                                       the markdown section: per cell and router the median of
                                       the runs and their min-max, and predicted_ttft's targets
"""
import json
import statistics
import sys
import urllib.request

UNDER_TEST = "fulcrum predicted_ttft"


def snapshot(base, n):
    out = []
    for i in range(n):
        text = urllib.request.urlopen(f"http://127.0.0.1:{base + i}/metrics", timeout=5).read().decode()

        def value(name):
            total = 0.0
            for line in text.splitlines():
                if line.startswith(name + "{") or line.startswith(name + " "):
                    total += float(line.rsplit(" ", 1)[1])
            return total

        out.append({
            "queries": value("vllm:prefix_cache_queries_total"),
            "hits": value("vllm:prefix_cache_hits_total"),
            "requests": value("vllm:request_success_total"),
        })
    return out


def cell(workload_path, before_path, after_path, fields):
    text = open(workload_path).read().strip()
    try:
        rec = json.loads(text.splitlines()[-1]) if text else {}
    except ValueError:
        rec = {}
    if not rec:
        rec = {"requests": 0, "failed": -1, "failures": {"client_crashed": 1}}
    before, after = json.load(open(before_path)), json.load(open(after_path))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    rec["hit_rate"] = round(hits / queries, 4) if queries else 0.0
    rec["per_backend"] = [int(a["requests"] - b["requests"]) for a, b in zip(after, before)]
    for kv in fields:
        k, v = kv.split("=", 1)
        try:
            v = json.loads(v)
        except ValueError:
            pass
        rec[k] = v
    return rec


def med(values):
    return statistics.median(values) if values else float("nan")


def fmt_ms(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def spread(values, f):
    if len(values) == 1:
        return f(values[0])
    return f"{f(med(values))} ({f(min(values))}-{f(max(values))})"


def table(results_path, meta_path, out_path):
    meta = json.load(open(meta_path))
    recs = [json.loads(line) for line in open(results_path) if line.strip()]
    routers = meta["routers"]
    lines = []
    verdicts = []
    for wl in meta["workloads"]:
        for load in meta["loads"]:
            rows = {}
            for r in routers:
                rs = [x for x in recs if x["workload"] == wl and x["load"] == load and x["router"] == r]
                if rs:
                    rows[r] = rs
            if not rows:
                continue
            rate = rows[next(iter(rows))][0]["offered_req_per_s"]
            lines.append(f"| **{wl}, {load}%** ({rate:.1f} req/s) | | | | | | |")
            for r, rs in rows.items():
                per = [x["per_backend"] for x in rs]
                per_med = "/".join(str(int(med([p[i] for p in per]))) for i in range(len(per[0])))
                errors = sum(max(0, x["failed"]) for x in rs)
                crashed = sum(1 for x in rs if x["failed"] < 0)
                err = f"{errors}" + (f" +{crashed} crashed" if crashed else "")
                name = f"**{r}**" if r == UNDER_TEST else r
                lines.append(
                    f"| {name} | {spread([x['ttft_p50_ms'] for x in rs], fmt_ms)} | "
                    f"{spread([x['ttft_p99_ms'] for x in rs], fmt_ms)} | "
                    f"{spread([x['e2e_p99_ms'] for x in rs], fmt_ms)} | "
                    f"{spread([100 * x['hit_rate'] for x in rs], lambda v: f'{v:.1f}%')} | "
                    f"{per_med} | {err} |")
            if UNDER_TEST in rows:
                verdicts.append(verdict(wl, load, rows))
    head = [
        "| cell / router | TTFT p50 ms | TTFT p99 ms | e2e p99 ms | hit rate | requests per backend (median) | errors (all runs) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    vhead = [
        "| cell | TTFT p99 below every peer's | TTFT p50 within 10% of the best peer's | hit rate at least best peer's - 1 pt | 0 errors | p99 lowest in runs |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    passed = sum(1 for v in verdicts for ok in v[1] if ok)
    total = sum(len(v[1]) for v in verdicts)
    md = "\n".join(head + lines) + "\n\n" + "\n".join(vhead + [v[0] for v in verdicts]) + "\n"
    md += f"\n{UNDER_TEST}: {passed} of {total} target checks pass.\n"
    open(out_path, "w").write(md)


def verdict(wl, load, rows):
    me = rows[UNDER_TEST]
    peers = {r: rs for r, rs in rows.items() if r != UNDER_TEST}
    p99 = med([x["ttft_p99_ms"] for x in me])
    p50 = med([x["ttft_p50_ms"] for x in me])
    hit = med([100 * x["hit_rate"] for x in me])
    errors = sum(abs(x["failed"]) for x in me)
    peer_p99 = {r: med([x["ttft_p99_ms"] for x in rs]) for r, rs in peers.items()}
    peer_p50 = {r: med([x["ttft_p50_ms"] for x in rs]) for r, rs in peers.items()}
    peer_hit = {r: med([100 * x["hit_rate"] for x in rs]) for r, rs in peers.items()}
    best99 = min(peer_p99, key=peer_p99.get)
    best50 = min(peer_p50, key=peer_p50.get)
    besthit = max(peer_hit, key=peer_hit.get)
    ok99 = p99 < peer_p99[best99]
    ok50 = p50 <= 1.10 * peer_p50[best50]
    okhit = hit >= peer_hit[besthit] - 1.0
    ok0 = errors == 0
    # Runs in which predicted_ttft's p99 was below every peer's p99 of the same run.
    wins = n = 0
    for x in me:
        same = [y["ttft_p99_ms"] for rs in peers.values() for y in rs if y["run"] == x["run"]]
        if same:
            n += 1
            wins += x["ttft_p99_ms"] < min(same)

    def mark(ok):
        return "PASS" if ok else "**FAIL**"

    row = (f"| {wl}, {load}% | {mark(ok99)}: {p99:.1f} vs {peer_p99[best99]:.1f} ({best99}) | "
           f"{mark(ok50)}: {p50:.1f} vs {peer_p50[best50]:.1f} ({best50}) | "
           f"{mark(okhit)}: {hit:.1f}% vs {peer_hit[besthit]:.1f}% ({besthit}) | "
           f"{mark(ok0)}: {errors} | {wins}/{n} |")
    return row, [ok99, ok50, okhit, ok0]


def main():
    cmd = sys.argv[1]
    if cmd == "snapshot":
        print(json.dumps(snapshot(int(sys.argv[2]), int(sys.argv[3]))))
    elif cmd == "cell":
        print(json.dumps(cell(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])))
    elif cmd == "line":
        d = json.load(sys.stdin)
        print(f"run {d['run']} {d['workload']:6} {d['load']:3}% {d['router']:26} {d['offered_req_per_s']:6.1f} req/s  "
              f"TTFT p50 {d['ttft_p50_ms']:7.1f}  p99 {d['ttft_p99_ms']:7.1f}  e2e p99 {d['e2e_p99_ms']:7.1f}  "
              f"hits {100 * d['hit_rate']:5.1f}%  err {d['failed']}  per backend {'/'.join(map(str, d['per_backend']))}  "
              f"router CPU {d.get('router_cpu_s', 0)}s  late p99 {d.get('client_late_p99_ms', 0)} ms", flush=True)
    elif cmd == "retable":
        import os, tempfile
        d = json.load(open(sys.argv[2]))
        with tempfile.TemporaryDirectory() as tmp:
            r, m = os.path.join(tmp, "r.jsonl"), os.path.join(tmp, "m.json")
            with open(r, "w") as f:
                for x in d.pop("results"):
                    f.write(json.dumps(x) + "\n")
            json.dump(d, open(m, "w"))
            table(r, m, sys.argv[3])
    elif cmd == "table":
        table(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
