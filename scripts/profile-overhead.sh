#!/usr/bin/env bash
# Does the profiler cost anything while it is off? Runs the wgrad-bench of a
# commit from before the profiler existed (BASE) and this one (NEW)
# alternately, ROUNDS times each, on the same workloads and modes, and prints
# the median of each one's medians side by side with their ratio.
#
#   scripts/profile-overhead.sh BASE_BIN NEW_BIN [ROUNDS] [MODES]
#
# Build BASE from a worktree of the earlier commit with its own target dir,
# e.g. `git worktree add --detach /tmp/base 1212df1 && cd /tmp/base &&
# CARGO_TARGET_DIR=/tmp/base-target cargo build --release --bin wgrad-bench`.
set -euo pipefail
base=$1
new=$2
rounds=${3:-3}
modes=${4:-merged,compiled}
out=$(mktemp -d)
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$out}
for r in $(seq 1 "$rounds"); do
    "$base" --mode "$modes" --steps 20 --json "$out/base-$r.json" >/dev/null 2>&1
    "$new" --mode "$modes" --steps 20 --json "$out/new-$r.json" >/dev/null 2>&1
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def medians(kind):
    runs = {}
    for r in range(1, rounds + 1):
        data = json.load(open(f"{out}/{kind}-{r}.json"))
        for row in data["results"]:
            runs.setdefault((row["workload"], row["mode"]), []).append(row["median_ms"])
    return data["adapter"], {k: statistics.median(v) for k, v in runs.items()}
adapter, base = medians("base")
_, new = medians("new")
print(f"adapter: {adapter}; {rounds} alternating runs of 20 steps each; median of the runs' medians")
print("| workload | mode | before the profiler (ms) | profiler off (ms) | off / before |")
print("|---|---|---:|---:|---:|")
for key in base:
    print(f"| {key[0]} | {key[1]} | {base[key]:.2f} | {new[key]:.2f} | {new[key] / base[key]:.3f} |")
PY
