#!/usr/bin/env python3
"""Sums Nsight Compute's per-launch GPU times by kernel name.

    python3 benches/gpu/kernel_table.py NCU_CSV [--top 40]

NCU_CSV is the stdout of `ncu --metrics gpu__time_duration.sum --csv --page raw --print-units base
PROGRAM` (one row per kernel launch; other lines, e.g. the program's own output, are skipped). Prints
a table: kernel, launches, total ms, share of all kernel time, mean us per launch; the total last.
"""
import argparse
import csv
import io
import sys
from collections import defaultdict


def rows(text):
    """The CSV part of ncu's output: from the header line holding "Kernel Name" on."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if '"Kernel Name"' in line:
            return list(csv.DictReader(io.StringIO("\n".join(lines[i:]))))
    return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    recs = rows(open(a.csv, errors="replace").read())
    total = defaultdict(float)
    count = defaultdict(int)
    for r in recs:
        t = r.get("gpu__time_duration.sum", "")
        try:
            ns = float(t.replace(",", ""))
        except ValueError:
            continue  # the units row
        name = r["Kernel Name"].split("(")[0]
        total[name] += ns
        count[name] += 1
    if not total:
        sys.exit("no kernel rows found")
    all_ns = sum(total.values())
    print(f"| kernel | launches | total ms | share | mean us |\n|---|---:|---:|---:|---:|")
    for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"| `{name[:80]}` | {count[name]} | {ns / 1e6:.2f} | {100 * ns / all_ns:.1f} % | "
              f"{ns / count[name] / 1e3:.1f} |")
    print(f"\nall kernels: {sum(count.values())} launches, {all_ns / 1e6:.1f} ms of GPU time")


if __name__ == "__main__":
    main()
