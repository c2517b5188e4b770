#!/usr/bin/env bash
# Two wgrad-bench builds (or settings) side by side: runs A and B
# alternately, ROUNDS times each, on the same workloads and modes, and
# prints the median of each one's medians, their ratio, and kernels per
# step. A and B are commands (a binary, or a wrapper that adds flags such
# as `--limits webgpu`); workloads only one of them has are listed alone.
#
#   scripts/bench-ab.sh A B [ROUNDS] [MODES] [A_LABEL] [B_LABEL]
set -euo pipefail
a=$1
b=$2
rounds=${3:-3}
modes=${4:-merged,compiled}
la=${5:-A}
lb=${6:-B}
out=$(mktemp -d)
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$out}
for r in $(seq 1 "$rounds"); do
    $a --mode "$modes" --steps 20 --json "$out/a-$r.json" >/dev/null 2>&1
    $b --mode "$modes" --steps 20 --json "$out/b-$r.json" >/dev/null 2>&1
done
python3 - "$out" "$rounds" "$la" "$lb" <<'PY'
import json, statistics, sys
out, rounds, la, lb = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(kind):
    runs, kernels = {}, {}
    for r in range(1, rounds + 1):
        data = json.load(open(f"{out}/{kind}-{r}.json"))
        for row in data["results"]:
            key = (row["workload"], row["mode"])
            runs.setdefault(key, []).append(row["median_ms"])
            kernels[key] = row["kernels_per_step"]
    return data["adapter"], {k: statistics.median(v) for k, v in runs.items()}, kernels
adapter, ta, ka = load("a")
_, tb, kb = load("b")
print(f"adapter: {adapter}; {rounds} alternating runs of 20 steps each; median of the runs' medians")
print(f"| workload | mode | {la} ms | {lb} ms | {lb} / {la} | kernels/step {la} | kernels/step {lb} |")
print("|---|---|---:|---:|---:|---:|---:|")
for key in sorted(set(ta) | set(tb)):
    ma, mb = ta.get(key), tb.get(key)
    ratio = f"{mb / ma:.3f}" if ma and mb else "-"
    fa = f"{ma:.2f}" if ma else "-"
    fb = f"{mb:.2f}" if mb else "-"
    print(f"| {key[0]} | {key[1]} | {fa} | {fb} | {ratio} | {ka.get(key, '-')} | {kb.get(key, '-')} |")
PY
