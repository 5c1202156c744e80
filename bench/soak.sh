#!/usr/bin/env bash
# bench/soak.sh: the soak run of issue #11. Mixed traffic for 30 minutes (keep-alive and new
# connections, WebSockets, 1 MiB bodies, slow clients, malformed requests) through the release
# gateway running as its own process, while the Consul emulator churns instances and the config
# is rewritten and reloaded every 30 s. RSS, descriptors and tokio tasks are sampled every
# minute; the run fails on any unexpected error, or when RSS or descriptors grew 5 % or more
# between the warm-up and the end.
#
# The driver is the ignored test tests/soak.rs: it starts the gateway binary, the emulator and
# the upstreams on 127.0.0.1 (kernel-chosen ports) and stops all of them itself. This script
# builds and runs it, prints the result and appends it to bench/RESULTS.md ("Soak (issue #11)").
set -euo pipefail

SCRIPT_NAME="bench/soak.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

MINUTES="${SOAK_MINUTES:-30}"
OUT="${SOAK_OUT:-}"
RECORD=1
NOTE=""

usage() {
  cat <<EOF
Usage: bench/soak.sh [options]

Builds the gateway and the driver in release, runs the soak (tests/soak.rs) and records the
samples and the verdict in bench/RESULTS.md. A default run takes about 35 minutes plus the
build. Exit status 1 when the soak failed.

  -m MINUTES     minutes of traffic (default \$SOAK_MINUTES or 30; fractions allowed); the
                 warm-up is 3 minutes or 10 % of the run, whichever is shorter
  -o DIR         keep the samples (samples.csv, soak.md), the gateway's config and log, and
                 the driver's output in DIR (default \$SOAK_OUT or a new /tmp dir)
  --no-record    print the result but do not append it to bench/RESULTS.md
  --note TEXT    a note recorded with the result
  -h, --help     this help
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -m) MINUTES="${2:?}"; shift 2 ;;
    -o) OUT="${2:?}"; shift 2 ;;
    --no-record) RECORD=0; shift ;;
    --note) NOTE="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option: $1 (see -h)" ;;
  esac
done
[[ "$MINUTES" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "-m: not a number of minutes: $MINUTES"
command -v cargo >/dev/null 2>&1 || die "cargo not found (Rust is needed to build the driver)"
[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-soak.XXXXXX)"
mkdir -p "$OUT"
CMDLINE="bench/soak.sh -m $MINUTES"

log "building (release) and running the soak: $MINUTES min of traffic; output in $OUT"
STARTED_AT="$(date -u '+%Y-%m-%d %H:%M UTC')"
COMMIT="$(commit_line)"
status=0
(
  cd "$REPO_ROOT"
  # The driver reads these two; the gateway it starts gets a clean environment.
  SOAK_MINUTES="$MINUTES" SOAK_OUT="$OUT" \
    cargo test --release --test soak -- --ignored --nocapture
) 2>&1 | tee "$OUT/driver.log" || status=$?
[ -f "$OUT/soak.md" ] || die "the driver wrote no result (build or start failure); see $OUT/driver.log"

verdict="FAIL"
grep -q '^\*\*Verdict: PASS\*\*' "$OUT/soak.md" && verdict="PASS"
SUMMARY="$OUT/summary.md"
{
  echo "### $STARTED_AT · commit $COMMIT · $MINUTES min · $verdict"
  echo
  echo "- machine: $(machine_line)"
  echo "- command: \`$CMDLINE\` (\`cargo test --release --test soak -- --ignored --nocapture\`; the gateway is target/release/meshgate)"
  [ -n "$NOTE" ] && echo "- note: $NOTE"
  cat "$OUT/soak.md"
} >"$SUMMARY"

echo
cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
  results="$BENCH_DIR/RESULTS.md"
  # Runs go at the end of the "Soak (issue #11)" section, which sits just before "# Runs".
  if ! grep -q '^## Soak (issue #11)' "$results"; then
    awk '/^# Runs$/ && !done { print "## Soak (issue #11) (`bench/soak.sh`)"; print ""; done = 1 }
         { print }' "$results" >"$results.tmp" && mv "$results.tmp" "$results"
  fi
  awk -v f="$SUMMARY" '
    /^# Runs$/ && !done { while ((getline l < f) > 0) print l; print ""; done = 1 }
    { print }' "$results" >"$results.tmp" && mv "$results.tmp" "$results"
  log "appended to bench/RESULTS.md (section Soak (issue #11))"
else
  log "not recorded (--no-record)"
fi
[ "$verdict" = PASS ] && [ "$status" = 0 ] || exit 1
