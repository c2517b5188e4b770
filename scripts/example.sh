#!/usr/bin/env bash
# Train the MLP on the digits data set (data/digits.csv).
# Arguments are passed to the example, e.g. scripts/example.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-vulkan.sh

# Mesa's Vulkan drivers probe Wayland and print "XDG_RUNTIME_DIR is invalid"
# on headless machines; a private runtime dir keeps the output clean.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR=$(mktemp -d)
    export XDG_RUNTIME_DIR
fi

cargo run --release --example mlp_digits -- "$@"
