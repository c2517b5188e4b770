#!/usr/bin/env bash
# Runs prebuilt wgrad test binaries (copied into .gpu/tests/ from
# target/debug/deps, stripped) on a GPU machine, so that the correctness
# suites that depend on the driver (NaN propagation, hostile input, eager
# vs compiled, the forward ops) are checked on a real GPU's Vulkan driver,
# not only on lavapipe. Each binary runs under a time cap; output goes to
# $OUT/checks.log (default /tmp/out). Prints one summary line per binary.
#
#   bash scripts/h200-checks.sh [DIR]      (default .gpu/tests)
set -u
DIR=${1:-.gpu/tests}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
for bin in "$DIR"/*; do
    [ -f "$bin" ] || continue
    chmod +x "$bin"
    name=$(basename "$bin")
    log=$(mktemp)
    timeout -k 5 "${CHECK_TIMEOUT:-60}" "$bin" --test-threads 4 >"$log" 2>&1
    rc=$?
    { echo "=== $name (exit $rc)"; cat "$log"; } >>"$OUT/checks.log"
    echo "$name: exit $rc, $(grep -E '^test result' "$log" | tail -1)"
    grep -E '^test .* FAILED$' "$log" | sed "s/^/  /"
done
