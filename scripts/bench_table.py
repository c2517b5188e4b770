#!/usr/bin/env python3
"""Side-by-side table of wgrad-bench and scripts/torch_workloads.py results.

    python3 scripts/bench_table.py WGRAD_JSON TORCH_JSON [WGRAD_MATMUL_LOG]

WGRAD_JSON is `wgrad-bench --json` output, TORCH_JSON `torch_workloads.py
--json` output. wgrad-bench writes no JSON for --matmul, so its matmul rows
are read from the markdown table in that run's log (WGRAD_MATMUL_LOG).
Missing files or entries show as '-'. Standard library only.
"""

import json
import re
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"({path}: {e})")
        return {}


def wgrad_matmul(path):
    """{n: GFLOP/s} from the '| n | median ms | GFLOP/s |' rows of a wgrad-bench log."""
    try:
        text = open(path).read()
    except OSError:
        return {}
    return {int(n): float(g) for n, g in re.findall(r"^\|\s*(\d+)\s*\|\s*[\d.]+\s*\|\s*([\d.]+)\s*\|\s*$", text, re.M)}


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    w, t = load(argv[1]), load(argv[2])
    wmed = {(r["workload"], r["mode"]): r["median_ms"] for r in w.get("results", [])}
    tmed = {(r["workload"], r["mode"]): r.get("median_ms") for r in t.get("results", [])}
    terr = {(r["workload"], r["mode"]) for r in t.get("results", []) if r.get("error")}
    print(f"wgrad: {w.get('adapter', '?')}")
    print(f"torch: {t.get('device', '?')}, torch {t.get('torch', '?')}, CUDA {t.get('cuda', '?')}")
    print("median step ms (lower is better); ratio > 1 means wgrad is slower\n")
    print(
        "| workload | wgrad eager | wgrad merged | wgrad compiled | torch eager | torch.compile"
        " | wgrad compiled / torch eager | wgrad compiled / torch.compile |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"W1": "W1 mlp", "W2": "W2 elementwise", "W3": "W3 matmul", "W4": "W4 norm-softmax", "W5": "W5 tiny-chain"}
    for wid in ["W1", "W2", "W3", "W4", "W5"]:
        we, wm, wc = (wmed.get((wid, m)) for m in ("eager", "merged", "compiled"))
        te, tc = tmed.get((wid, "eager")), tmed.get((wid, "compile"))
        tc_s = "failed" if (wid, "compile") in terr else fmt(tc)
        print(
            f"| {names[wid]} | {fmt(we)} | {fmt(wm)} | {fmt(wc)} | {fmt(te)} | {tc_s}"
            f" | {ratio(wc, te)} | {ratio(wc, tc)} |"
        )

    wmm = wgrad_matmul(argv[3]) if len(argv) > 3 else {}
    tmm = {(r["n"], r["tf32"]): r["gflops"] for r in t.get("matmul", [])}
    sizes = sorted(set(wmm) | {n for n, _ in tmm})
    if sizes:
        print("\n| matmul n×n @ n×n, GFLOP/s | wgrad | torch fp32 | torch tf32 | wgrad / torch fp32 |")
        print("|---:|---:|---:|---:|---:|")
        for n in sizes:
            wg, tf, tt = wmm.get(n), tmm.get((n, False)), tmm.get((n, True))
            print(f"| {n} | {fmt(wg, 1)} | {fmt(tf, 1)} | {fmt(tt, 1)} | {ratio(wg, tf)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
