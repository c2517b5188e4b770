#!/usr/bin/env bash
# Run the whole test suite: unit, integration and example tests, then doctests.
# Extra arguments go to the first `cargo test` (before its `--`), e.g.
#   scripts/test.sh --release
#   scripts/test.sh --test autograd
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-vulkan.sh

# Mesa's Vulkan drivers probe Wayland and print "XDG_RUNTIME_DIR is invalid"
# on headless machines; a private runtime dir keeps the output clean.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
fi

cargo test --lib --bins --tests --examples "$@" -- --test-threads 2
# Criterion benches run each benchmark once under `cargo test` (a smoke run).
cargo test --benches "$@"
# lavapipe picks the direct matmul; run the matmul-heavy tests on the
# tiled (GPU) template as well, so both are exercised on the CI device.
# (The compiled step's matmul epilogues, off with the direct template, run
# here too.)
WGRAD_MATMUL=tiled cargo test "$@" --test ops_forward --test gradcheck --test compiled --test step --test compiled_differential -- --test-threads 2
# (Not its 160 MiB program: the tiled template is slow on a CPU.)
WGRAD_MATMUL=tiled cargo test "$@" --test memory_plan -- --skip large_program --test-threads 2
# The whole suite again on exactly WebGPU's default limits (8 storage
# bindings per kernel, 128 MiB per binding, no shader-f16): what a browser
# allows. Same binaries, so this costs run time, not build time.
WGRAD_LIMITS=webgpu cargo test --lib --bins --tests "$@" -- --test-threads 2
# And with arenas on the adapter's own limits (by default a device with 32
# or more bindings per kernel gives each tensor its own buffer).
WGRAD_ARENAS=always cargo test --lib --bins --tests "$@" -- --test-threads 2
cargo test --doc
# The compiled tests with row kernels on small shapes too (min-rows=1; by
# default a compiled step outside a batch family gives only 32 rows and
# more one, while the compiled backward and batch families give any number
# of rows one), in every row form, and with each optional pass off: every
# pass on and off against eager mode.
COMPILED="--test compiled_differential --test compiled --test step --test row_kernels"
WGRAD_PASSES=min-rows=1 cargo test "$@" $COMPILED --test hostile --test cnn_digits -- --test-threads 2
WGRAD_PASSES=min-rows=1 WGRAD_ROWS=workgroup cargo test "$@" --test compiled_differential --test step --test row_kernels -- --test-threads 2
# The workgroup form with subgroup operations, where the adapter has them
# (lavapipe does; elsewhere this repeats the plain workgroup form).
WGRAD_PASSES=min-rows=1 WGRAD_ROWS=subgroups cargo test "$@" --test step --test row_kernels -- --test-threads 2
WGRAD_PASSES=min-rows=1,-remat cargo test "$@" --test compiled_differential --test row_kernels -- --test-threads 2
WGRAD_PASSES=min-rows=1,-row-sums cargo test "$@" --test compiled_differential --test row_kernels -- --test-threads 2
WGRAD_PASSES=-rows,-reduce-stores,-epilogues,-row-sums cargo test "$@" $COMPILED -- --test-threads 2
