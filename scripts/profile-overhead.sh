#!/usr/bin/env bash
# Does the profiler cost anything while it is off? The wgrad-bench of a
# commit from before the profiler existed (BASE) against this one (NEW),
# alternately (see bench-ab.sh).
#
#   scripts/profile-overhead.sh BASE_BIN NEW_BIN [ROUNDS] [MODES]
#
# Build BASE from a worktree of the earlier commit with its own target dir,
# e.g. `git worktree add --detach /tmp/base 1212df1 && cd /tmp/base &&
# CARGO_TARGET_DIR=/tmp/base-target cargo build --release --bin wgrad-bench`.
exec "$(dirname "$0")/bench-ab.sh" "$1" "$2" "${3:-3}" "${4:-merged,compiled}" "before the profiler" "profiler off"
