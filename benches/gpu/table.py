#!/usr/bin/env python3
"""Markdown table of the GPU training benchmark: cpmv vs PyTorch, one row per (version, mode, seq).

    python3 benches/gpu/table.py results/*.jsonl [--peak-tflops 989] [--pytorch-weights best|all]

Reads JSON lines written by `cpmv train bench` (impl "cpmv") and benches/gpu/torch_baseline.py
(impl "pytorch"); other lines are ignored. Both are timed on the same workload, so both MFU columns
use the cpmv line's flops_per_step (model FLOPs of one step, no recompute) for the same
version/mode/seq, divided by the step time and the peak (default 989 TFLOP/s, dense bf16 H100 SXM).
Where no cpmv line has flops_per_step, the cpmv line's own "mfu" is shown and PyTorch's MFU is left
empty. If a configuration was run more than once, the last successful line counts (else the last
error). --pytorch-weights best (default) keeps the faster PyTorch weights variant per row and names
it in the cell; all gives one row per variant. Errors (OOM, crash) are shown in the cells.
"""
import argparse, json, sys

MODES = {"full": 0, "lora": 1, "lora-embed": 2}


def load(paths):
    lines = []
    for path in paths:
        with open(path) as f:
            for n, raw in enumerate(f, 1):
                raw = raw.strip()
                if not raw.startswith("{"):
                    continue
                try:
                    d = json.loads(raw)
                except json.JSONDecodeError:
                    print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
                    continue
                if d.get("impl") in ("cpmv", "pytorch") and not d.get("check"):
                    lines.append(d)
    return lines


def ok(d):
    return d is not None and not d.get("error") and d.get("step_s")


def pick(old, new):
    """Last successful line wins; an error only replaces another error."""
    return new if old is None or ok(new) or not ok(old) else old


def gib(b):
    return f"{b / 2**30:.1f}" if b else "–"


def err(d):
    return str(d["error"]).replace("|", "/").split("\n")[0][:60]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--pytorch-weights", choices=["best", "all"], default="best")
    ap.add_argument("--tiny", action="store_true", help="show the --tiny test lines instead of the real ones")
    args = ap.parse_args()
    peak = args.peak_tflops * 1e12

    cpmv, torch_ = {}, {}
    devices = {"cpmv": set(), "pytorch": set()}
    for d in load(args.files):
        if bool(d.get("tiny")) != args.tiny:
            continue
        key = (str(d.get("version")), d.get("mode"), d.get("seq"))
        devices[d["impl"]].add(d.get("device") or "?")
        if d["impl"] == "cpmv":
            # One row per layer path (`path`: blocks, fused or unfused; older lines: fused) and
            # weights dtype (f32 rows of CPMV_PATHS=f32 / blocks-f32 beside the bf16 ones).
            path = d.get("path") or "fused"
            if d.get("weights") not in (None, "bf16"):
                path += f" {d['weights']}"
            ckey = key + (path,)
            cpmv[ckey] = pick(cpmv.get(ckey), d)
        else:
            wkey = key + (d.get("weights"),)
            torch_[wkey] = pick(torch_.get(wkey), d)

    rows = {}  # (version, mode, seq, cpmv path, weights or None) -> (cpmv line, pytorch line)
    for key in {k[:3] for k in cpmv} | {k[:3] for k in torch_}:
        variants = [d for k, d in torch_.items() if k[:3] == key]
        paths = sorted(k[3] for k in cpmv if k[:3] == key) or ["fused"]
        for path in paths:
            c = cpmv.get(key + (path,))
            if args.pytorch_weights == "all" and variants:
                for d in variants:
                    rows[key + (path, d.get("weights"))] = (c, d)
            else:
                good = [d for d in variants if ok(d)]
                best = max(good, key=lambda d: d["tokens_per_s"]) if good else (variants[-1] if variants else None)
                rows[key + (path, None)] = (c, best)

    head = ["version", "mode", "seq", "cpmv path", "cpmv tok/s", "cpmv MFU %", "cpmv peak GiB", "PyTorch tok/s (weights)",
            "PyTorch MFU %", "PyTorch peak GiB", "speed cpmv/PyTorch", "memory cpmv/PyTorch"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|")
    order = lambda k: (k[0], MODES.get(k[1], 9), k[1], k[2] or 0, k[3], k[4] or "")
    for key in sorted(rows, key=order):
        c, p = rows[key]
        flops = c.get("flops_per_step") if c else None
        cells = [key[0], key[1], str(key[2]), key[3]]
        if c is None:
            cells += ["not run", "", ""]
        elif not ok(c):
            cells += [err(c), "", gib(c.get("peak_mem_bytes"))]
        else:
            mfu = 100 * flops / c["step_s"] / peak if flops else c.get("mfu")
            if not flops and mfu is not None and mfu <= 1:  # a fraction, as written by cpmv
                mfu *= 100
            cells += [f"{c['tokens_per_s']:.0f}", f"{mfu:.1f}" if mfu is not None else "–",
                      gib(c.get("peak_mem_bytes"))]
        if p is None:
            cells += ["not run", "", ""]
        elif not ok(p):
            cells += [f"{err(p)} ({p.get('weights')})", "", gib(p.get("peak_mem_bytes"))]
        else:
            cells += [f"{p['tokens_per_s']:.0f} ({p.get('weights')})",
                      f"{100 * flops / p['step_s'] / peak:.1f}" if flops else "–", gib(p.get("peak_mem_bytes"))]
        if ok(c) and ok(p):
            cells.append(f"{c['tokens_per_s'] / p['tokens_per_s']:.2f}×")
            cm, pm = c.get("peak_mem_bytes"), p.get("peak_mem_bytes")
            cells.append(f"{cm / pm:.2f}×" if cm and pm else "–")
        else:
            cells += ["–", "–"]
        print("| " + " | ".join(cells) + " |")

    print()
    print(f"MFU = flops_per_step (cpmv's counter, same work for both) / step time / {args.peak_tflops:g} TFLOP/s."
          + (" PyTorch: the faster weights variant per row (named in the cell)." if args.pytorch_weights == "best" else ""))
    for impl, names in devices.items():
        if names:
            print(f"{impl} device: {', '.join(sorted(names))}")
    if len(devices["pytorch"]) > 1:
        print("WARNING: the PyTorch lines come from more than one device.")


if __name__ == "__main__":
    main()
