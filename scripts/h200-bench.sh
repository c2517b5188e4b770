#!/usr/bin/env bash
# wgrad (Vulkan) against PyTorch (CUDA) on the workloads of WORKLOADS.md, on a
# GPU machine. Run from the repo root, with the Vulkan loader and driver set up:
#
#   bash scripts/h200-bench.sh [WGRAD_BENCH_BINARY]     (default .gpu/wgrad-bench)
#
# Runs, each under its own time cap so that one failing or hanging part never
# stops the others: a short nvidia-smi / Vulkan diagnosis, wgrad-bench's five
# workloads in its three modes, wgrad-bench --matmul, then
# scripts/torch_workloads.py (eager and torch.compile, plus matmul fp32/TF32);
# last, scripts/bench_table.py prints the two side by side. Everything is
# logged (tee) under $OUT (default /tmp/out): wgrad.json, wgrad.svg, wgrad.log,
# wgrad-matmul.log, torch.json, torch.log, table.txt.
# Expected: about 2 minutes on an H200; at most ~6 minutes with every cap hit.
#
# Environment, for smoke runs elsewhere (defaults are the full benchmark):
#   STEPS=20  MATMUL=256,512,1024,2048,4096  TORCH_MATMUL=1024,2048,4096
#   WGRAD_ARGS=  (e.g. --small)  TORCH_DEVICE=cuda  PYTHON=python3  WGPU_BACKEND=vulkan
#   WGRAD_TIMEOUT=90  MATMUL_TIMEOUT=40  TORCH_TIMEOUT=180  (seconds)
set -u

BIN=${1:-.gpu/wgrad-bench}
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-20}
MATMUL=${MATMUL:-256,512,1024,2048,4096}
TORCH_MATMUL=${TORCH_MATMUL:-1024,2048,4096}
WGRAD_ARGS=${WGRAD_ARGS:-}
TORCH_DEVICE=${TORCH_DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan} # no silent fallback to OpenGL
# Cold torch.compile caches, so that its first steps pay the full compile (as on a fresh machine).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}
mkdir -p "$OUT"
BIN=$(realpath -m "$BIN") OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.." || exit 1

part() { echo; echo "=== $* ($(date +%T), ${SECONDS}s in)"; }
# run LOG CAP CMD...: CMD under a time cap, output also into $OUT/LOG.
run() {
    local log=$1 cap=$2
    shift 2
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || echo "!!! $* exited $rc$([ "$rc" = 124 ] && echo " (time cap ${cap}s)")" | tee -a "$OUT/$log"
}

part "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "no nvidia-smi"
echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}"
[ -n "${VK_DRIVER_FILES:-}" ] && ls -la ${VK_DRIVER_FILES//:/ }
ldconfig -p 2>/dev/null | grep -E 'libvulkan|libGLX_nvidia|libnvidia-glcore' | head -5
echo "C compiler (triton needs one for torch.compile): $(command -v gcc cc clang | head -1)"
echo "wgrad-bench: $BIN"
[ -f "$BIN" ] && [ ! -x "$BIN" ] && chmod +x "$BIN"

part "wgrad-bench workloads"
run wgrad.log "${WGRAD_TIMEOUT:-90}" "$BIN" --steps "$STEPS" --json "$OUT/wgrad.json" --svg "$OUT/wgrad.svg" $WGRAD_ARGS
grep -q '^adapter:.*llvmpipe' "$OUT/wgrad.log" && echo "!!! wgrad ran on llvmpipe (CPU), not the GPU"

part "wgrad-bench matmul"
run wgrad-matmul.log "${MATMUL_TIMEOUT:-40}" "$BIN" --matmul "$MATMUL" --steps "$STEPS"

part "torch"
run torch.log "${TORCH_TIMEOUT:-180}" "$PYTHON" -u scripts/torch_workloads.py --device "$TORCH_DEVICE" \
    --steps "$STEPS" --json "$OUT/torch.json" --matmul "$TORCH_MATMUL"

part "side by side"
"$PYTHON" scripts/bench_table.py "$OUT/wgrad.json" "$OUT/torch.json" "$OUT/wgrad-matmul.log" | tee "$OUT/table.txt"
echo "done in ${SECONDS}s; files in $OUT"
