#!/usr/bin/env python3
"""Turns criterion's estimates under target/criterion into a Markdown table.

Usage: python3 bench/core_table.py [target/criterion]
Prints one row per benchmark group (pick/<policy>, build/<table>) and one column per pool
size, each cell the median with its unit.
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")


def fmt(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.1f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    return f"{ns / 1_000_000:.2f} ms"


rows = {}
for est in sorted(root.glob("*/*/new/estimates.json")):
    group_dir, param = est.parent.parent.parent, est.parent.parent.name
    bench = json.loads((est.parent / "benchmark.json").read_text())
    group = bench["group_id"]
    median = json.loads(est.read_text())["median"]["point_estimate"]
    rows.setdefault(group, {})[param] = median

numeric = {g: r for g, r in rows.items() if all(p.isdigit() for p in r)}
other = {g: r for g, r in rows.items() if g not in numeric}
sizes = sorted({p for r in numeric.values() for p in r}, key=int)
print("| benchmark | " + " | ".join(f"n = {s}" for s in sizes) + " |")
print("| --- |" + " ---: |" * len(sizes))
for group in sorted(numeric, key=lambda g: (not g.startswith("pick"), g)):
    cells = [fmt(numeric[group][s]) if s in numeric[group] else "" for s in sizes]
    print(f"| {group} | " + " | ".join(cells) + " |")
if other:
    print()
    print("| benchmark | case | median |")
    print("| --- | --- | ---: |")
    for group in sorted(other):
        for case, ns in sorted(other[group].items()):
            print(f"| {group} | {case} | {fmt(ns)} |")
