#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) briefly, each starting from its
# committed corpus (fuzz/corpus/<target>/), and fails on the first crash,
# leak, timeout or out-of-memory. See FUZZING.md.
#
# cargo-fuzz needs nightly-only compiler flags; on the stable toolchain
# RUSTC_BOOTSTRAP=1 lets them through (as the fuzzing runs in FUZZING.md
# did).
#
#   FUZZ_SMOKE_SECS   seconds per target (default 11)
#   FUZZ_SANITIZER    address (default) or none
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${FUZZ_SMOKE_SECS:-11}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: cargo-fuzz is not installed (scripts/install-deps.sh installs it)" >&2
    exit 1
fi

start=$(date +%s)
cargo fuzz build -s "$sanitizer"
built=$(date +%s)
echo "fuzz-smoke: build took $((built - start)) s"

# New inputs go to a scratch directory (the first corpus directory), so the
# committed corpus is only read.
scratch=target/smoke-corpus
for target in $(cargo fuzz list); do
    rm -rf "${scratch:?}/$target"
    mkdir -p "$scratch/$target"
    echo "fuzz-smoke: $target for ${secs} s"
    if ! cargo fuzz run -s "$sanitizer" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"target/smoke-$target.log" 2>&1; then
        tail -n 60 "target/smoke-$target.log" >&2
        echo "fuzz-smoke: $target FAILED; the input is in fuzz/artifacts/$target/" >&2
        echo "fuzz-smoke: reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $target artifacts/$target/<file>" >&2
        exit 1
    fi
    grep -E '^Done ' "target/smoke-$target.log" || true
done
echo "fuzz-smoke: every target ran without a crash ($(( $(date +%s) - built )) s fuzzing)"
