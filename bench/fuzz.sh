#!/usr/bin/env bash
# Runs every fuzz target of crates/din/tests/fuzz.rs for SECONDS seconds
# (default 600), two at a time (one per core of a 2-core machine), and
# prints each target's executions. Not part of CI (about 30 minutes with
# the default); CI replays the corpus and runs 256 cases a target.
#
#   bash bench/fuzz.sh            # all five, ten minutes each
#   SECONDS_PER_TARGET=60 bash bench/fuzz.sh fuzz_config_parser_and_validator
#
# A failing input is written to target/fuzz-failures/; once fixed, add it
# (or a test of it) to crates/din/tests/fuzz/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export DIN_FUZZ_SECONDS=${SECONDS_PER_TARGET:-600}
grep -m1 'model name' /proc/cpuinfo || true
cargo test --release -p din --test fuzz -- --nocapture --test-threads 2 "$@" 2>&1 | tee target/fuzz.log \
  | grep -E '^fuzz |panicked|FAILED|test result'
