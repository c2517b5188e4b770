#!/usr/bin/env bash
# Run the whole test suite: unit, integration and example tests, then doctests.
# Extra arguments go to the first `cargo test` (before its `--`), e.g.
#   scripts/test.sh --release
#   scripts/test.sh --test autograd
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-vulkan.sh

cargo test --all-targets "$@" -- --test-threads 2
cargo test --doc
