#!/usr/bin/env python3
"""Summarise `fulcrum simulate --matrix ... --json` output: TTFT p50/p99 and hit rate per
scenario and policy, and check a candidate policy against the targets of issue P1.2 (TTFT p99
at or below least_connections everywhere, at most half of it where prompts share prefixes,
hit rate within 1 point of prefix_affinity, no backend idle while another queues).
Whether a scenario's prompts share prefixes is the reports' `shared_prefixes` (false for
random prompts without a shared prefix of at least one 64-token block; JSON written before
that field existed counts every scenario as sharing).
Usage: bench/sim/compare.py FILE.json [CANDIDATE] [--markdown]
With --markdown, prints the table of bench/RESULTS.md's P1.2 matrix section instead."""
import json
import sys

args = [a for a in sys.argv[1:] if a != "--markdown"]
markdown = "--markdown" in sys.argv[1:]
data = json.load(open(args[0]))
cand = args[1] if len(args) > 1 else "predicted_ttft"


def ms(v):
    return f"{v / 1000:.1f}s" if v >= 10_000 else f"{v:.0f}ms"


def cell(r):
    t = r["ttft_ms"]
    failed = f" ({r['failed']} failed)" if r["failed"] else ""
    return f"{ms(t['p50'])} / {ms(t['p99'])} / {100 * r['prefix_hit_rate']:.1f}%{failed}"


if markdown:
    cols = ["least_connections", "power_of_two", "prefix_affinity", "score", cand]
    print("| scenario | " + " | ".join(cols) + " | p99 vs least_connections | hit vs prefix_affinity | idle while queued |")
    print("| --- |" + " ---: |" * (len(cols) + 3))
    for sc in data["scenarios"]:
        reps = {r["policy"]: r for r in sc["reports"]}
        c, lc, pa = reps[cand], reps["least_connections"], reps["prefix_affinity"]
        ratio = c["ttft_ms"]["p99"] / lc["ttft_ms"]["p99"]
        hit = 100 * (c["prefix_hit_rate"] - pa["prefix_hit_rate"])
        cells = " | ".join(cell(reps[p]) for p in cols)
        print(f"| {sc['scenario']} | {cells} | {ratio:.2f}x | {hit:+.1f} pt | {100 * c.get('idle_while_queued', 0):.1f}% |")
    sys.exit(0)
misses = []
for sc in data["scenarios"]:
    reps = {r["policy"]: r for r in sc["reports"]}
    cells = []
    for pol, r in reps.items():
        t = r["ttft_ms"]
        fail = f" F{r['failed']}" if r["failed"] else ""
        cells.append(f"{pol[:10]:>10} {t['p50']:7.1f}/{t['p99']:8.1f}/{100*r['prefix_hit_rate']:5.1f}%{fail}")
    print(f"{sc['scenario']:<30} " + " | ".join(cells))
    if cand in reps and "least_connections" in reps:
        c, lc = reps[cand], reps["least_connections"]
        shared = c.get("shared_prefixes", True)
        if c["ttft_ms"]["p99"] > lc["ttft_ms"]["p99"]:
            misses.append(f"{sc['scenario']}: p99 {c['ttft_ms']['p99']:.0f} > least_connections {lc['ttft_ms']['p99']:.0f}")
        elif shared and c["ttft_ms"]["p99"] > 0.5 * lc["ttft_ms"]["p99"]:
            misses.append(f"{sc['scenario']}: p99 {c['ttft_ms']['p99']:.0f} above half of least_connections {lc['ttft_ms']['p99']:.0f}")
    if cand in reps and reps[cand].get("idle_while_queued", 0) > 0:
        misses.append(f"{sc['scenario']}: a backend idle while another queued in {100*reps[cand]['idle_while_queued']:.1f}% of samples")
    if cand in reps and "prefix_affinity" in reps:
        c, pa = reps[cand], reps["prefix_affinity"]
        if c["prefix_hit_rate"] < pa["prefix_hit_rate"] - 0.01:
            misses.append(f"{sc['scenario']}: hit {100*c['prefix_hit_rate']:.1f}% < prefix_affinity {100*pa['prefix_hit_rate']:.1f}% - 1")
print("\n".join(misses) if misses else "every target met")
