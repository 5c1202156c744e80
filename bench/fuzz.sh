#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ with cargo-fuzz (libFuzzer, nightly Rust) for a set time each,
# then minimises each target's corpus into fuzz/corpus/TARGET so that the inputs worth keeping
# are replayed by `cargo test` (tests/fuzz_corpus.rs). Crashes are left in fuzz/artifacts/TARGET;
# copy a crash input into fuzz/regressions/TARGET/ once its cause is fixed.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 300 s, every target)
#
# Needs a nightly toolchain (`rustup toolchain list`) and installs cargo-fuzz with cargo when it
# is missing. Prints one line per target: executions, corpus size, crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(config consul request_head path); fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: a nightly Rust toolchain is needed (cargo-fuzz builds with sanitizers)" >&2
    exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    work="$(mktemp -d)"
    log="$work/log"
    # A scratch corpus seeded with the saved one: new inputs land there, then are minimised back.
    mkdir -p "$work/new"
    cp "fuzz/corpus/$t"/* "$work/new/" 2>/dev/null || true
    set +e
    cargo +nightly fuzz run "$t" "$work/new" -- -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
    status=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    if [ "$status" -ne 0 ]; then
        echo "fuzz.sh: $t exited $status; the end of its log:" >&2
        tail -30 "$log" >&2
    fi
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    # Keep a minimal corpus that covers what the run found.
    cargo +nightly fuzz cmin "$t" "$work/new" >/dev/null 2>&1 || true
    rm -f "fuzz/corpus/$t"/*
    cp "$work/new"/* "fuzz/corpus/$t/" 2>/dev/null || true
    kept=$(find "fuzz/corpus/$t" -type f | wc -l)
    summary+=("$t: ${execs:-?} executions in ${secs}s, corpus ${kept} inputs, ${crashes} crash inputs, exit ${status}")
    rm -rf "$work"
done
printf '%s\n' "${summary[@]}"
