#!/usr/bin/env bash
# Fuzz each target for a bounded time (default 60 s each) with cargo-fuzz,
# growing the corpus in fuzz/corpus/<target>. Crashes land in
# fuzz/artifacts/<target>/: add the input to the corpus once fixed, and the
# replay in the test suite (tests/fuzz_corpus.rs) keeps it fixed.
#
#   fuzz/run.sh            # every target, 60 s each
#   SECS=600 fuzz/run.sh device_frame
#
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP
# unlocks them (`cargo install cargo-fuzz` first).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(device_frame box_frame admin_request config)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -max_len=4096 -rss_limit_mb=1024 2>&1 | tail -3
  # Keep only the inputs that add coverage: the corpus is committed.
  RUSTC_BOOTSTRAP=1 cargo fuzz cmin "$t" "fuzz/corpus/$t" >/dev/null 2>&1
done
