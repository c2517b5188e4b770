#!/usr/bin/env bash
# Train the MLP on the digits data set (data/digits.csv).
# Arguments are passed to the example, e.g. scripts/example.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-vulkan.sh

cargo run --release --example mlp_digits -- "$@"
