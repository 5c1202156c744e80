#!/usr/bin/env bash
# bench/cache.sh: what a cache hit costs against the same route without a cache (issue #14).
# Same rig as bench/overhead.sh (one nginx upstream, meshgate with one worker pinned to the
# proxy core, wrk pinned to the load-generator core), one keep-alive scenario, two configs:
#
#   bare   the run.sh route, no cache: every request is forwarded
#   hit    the same route with `cache = { default_ttl = "1h" }`: after the first request every
#          request is answered from the store (X-Cache: HIT), the upstream is not asked
#
# Only 127.0.0.1 is listened on and loaded; everything started here is stopped by PID on exit.
set -euo pipefail

SCRIPT_NAME="bench/cache.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

ROUNDS=3
DUR=8
WARMUP=2
CONNS=50
VARIANTS="bare,hit"
BUILD=1
OUT=""
MESHGATE_BIN="${MESHGATE_BIN:-}"
# Not passed on: meshgate reads MESHGATE_* variables as configuration.
export -n MESHGATE_BIN

usage() {
  cat <<EOF
Usage: bench/cache.sh [options]

Throughput, latency and CPU per request of a route answered from the cache against the same
route forwarding every request. Prints a markdown table of medians over interleaved rounds.

  -r N          interleaved rounds (default $ROUNDS)
  -d SECS       seconds per measured run (default $DUR)
  -w SECS       warm-up per run, not recorded (default $WARMUP)
  -c N          keep-alive connections (default $CONNS)
  --quick       smoke run: -r 1 -d 2 -w 1
  --no-build    do not run cargo; use \$MESHGATE_BIN or target/release/meshgate
  --no-pin      do not pin with taskset
  -o DIR        keep configs, logs and raw output in DIR (default: a new /tmp dir)
  -h, --help    this help
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="$2"; shift 2 ;;
    -d) DUR="$2"; shift 2 ;;
    -w) WARMUP="$2"; shift 2 ;;
    -c) CONNS="$2"; shift 2 ;;
    --quick) ROUNDS=1; DUR=2; WARMUP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-pin) PIN=0; shift ;;
    -o) OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
for n in "$ROUNDS" "$DUR" "$WARMUP" "$CONNS"; do is_uint "$n" || die "not a number: $n"; done
IFS=, read -r -a VARS <<<"$VARIANTS"

need_tools wrk nginx curl python3 taskset
CORES="$(nproc)"
LG_CPU="${LG_CPU:-0}"
PROXY_CPU="${PROXY_CPU:-$(( CORES > 1 ? 1 : 0 ))}"

if [ -z "$MESHGATE_BIN" ]; then
  MESHGATE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/meshgate"
  if [ "$BUILD" = 1 ]; then
    log "building meshgate (cargo build --release --bin meshgate) before any measurement"
    (cd "$REPO_ROOT" && cargo build --release --bin meshgate) || die "cargo build failed"
  fi
fi
[ -x "$MESHGATE_BIN" ] || die "no meshgate binary at $MESHGATE_BIN"

[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-cache.XXXXXX)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www" "$RAW"
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
: >"$RUN_DIR/www/1m.bin"
raise_nofile 4096

ports="$(free_ports 4)" || die "could not reserve free ports on 127.0.0.1"
read -r P_BA P_SA P_MESHGATE P_ADMIN <<<"$ports"
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE=4096 RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"
render "$CONF_DIR/meshgate.toml.in" "$RUN_DIR/bare.toml" PORT="$P_MESHGATE" ADMIN_PORT="$P_ADMIN" BA="$P_BA" BB="$P_BA"
# The route is the file's last table: the key lands on it.
{ cat "$RUN_DIR/bare.toml"; echo 'cache = { default_ttl = "1h" }'; } >"$RUN_DIR/hit.toml"

LOAD_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$LOAD_PID" ] && stop_pid "$LOAD_PID" 2
  stop_all
  log "stopped everything this run started; configs, logs and raw output: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg backend-a "$LG_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-a.err" -c "$RUN_DIR/backend-a.conf"
wait_http "http://127.0.0.1:$P_BA/" 30 "$LAST_PID" || die "upstream did not start (see $RUN_DIR/logs)"

TSV="$OUT/results.tsv"
printf 'variant\tround\treq_s\tp50_ms\tp99_ms\tcpu_s_per_100k\terrors\n' >"$TSV"

measure() { # VARIANT ROUND
  local v="$1" r="$2" f="$RAW/$1-r$2.txt" pid cpu0 cpu1
  start_bg "meshgate-$v" "$PROXY_CPU" env MESHGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    MESHGATE_SERVER__DRAIN_DELAY=0s "$MESHGATE_BIN" --config "$RUN_DIR/$v.toml"
  pid="$LAST_PID"
  wait_http "http://127.0.0.1:$P_MESHGATE/" 30 "$pid" || die "meshgate ($v) did not start (see $RUN_DIR/logs/meshgate-$v.log)"
  local url="http://127.0.0.1:$P_MESHGATE/"
  if [ "$v" = hit ]; then
    curl -s -o /dev/null "$url"
    curl -s -D - -o /dev/null "$url" | grep -qi '^x-cache: HIT' || die "the hit variant is not answered from the cache"
  fi
  local wrk=(wrk -t1 -c"$CONNS" --timeout 10s -s "$CONF_DIR/wrk-report.lua")
  [ "$PIN" = 1 ] && wrk=(taskset -c "$LG_CPU" "${wrk[@]}")
  if [ "$WARMUP" -gt 0 ]; then
    timeout -k 5 $((WARMUP + 30)) "${wrk[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 </dev/null || true
  fi
  cpu0="$(cpu_ticks "$pid")"
  ( exec timeout -k 5 $((DUR + 30)) "${wrk[@]}" -d"${DUR}s" "$url" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || true
  LOAD_PID=""
  cpu1="$(cpu_ticks "$pid")"
  stop_pid "$pid" 5
  forget_pid "$pid"
  awk -v v="$v" -v r="$r" -v d=$((cpu1 - cpu0)) -v hz="$CLK_TCK" '
    /^MESHGATE_BENCH / {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); x[kv[1]] = kv[2] }
      n = x["requests"]; s = x["duration_us"] / 1e6
      printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.3f\t%d\n", v, r, (s > 0) ? n / s : 0,
        x["p50_us"] / 1000, x["p99_us"] / 1000, (n > 0) ? d / hz / n * 100000 : 0,
        x["connect"] + x["read"] + x["write"] + x["status"] + x["timeout"]
    }' "$f" | tee -a "$TSV" | awk -F'\t' '{ printf "[run] %-5s r%s %8s req/s  p50 %s  p99 %s ms  cpu %s s/100k  err %s\n", $1, $2, $3, $4, $5, $6, $7 }' >&2
}

log "variants: ${VARS[*]}; $ROUNDS round(s) of ${DUR}s at $CONNS connections; output in $OUT"
for ((r = 1; r <= ROUNDS; r++)); do
  n="${#VARS[@]}"
  for ((i = 0; i < n; i++)); do
    measure "${VARS[$(( (i + r - 1) % n ))]}" "$r"
    sleep 1
  done
done

python3 - "$TSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
order = []
for r in rows:
    if r["variant"] not in order:
        order.append(r["variant"])
med = lambda v, k: statistics.median(float(r[k]) for r in rows if r["variant"] == v)
base = "bare" if "bare" in order else order[0]
print(f"\n| variant | req/s | vs {base} | p50 ms | p99 ms | CPU s/100k req | vs {base} | errors |")
print("|---|---|---|---|---|---|---|---|")
for v in order:
    rps, cpu = med(v, "req_s"), med(v, "cpu_s_per_100k")
    d_rps = (rps / med(base, "req_s") - 1) * 100
    d_cpu = (cpu / med(base, "cpu_s_per_100k") - 1) * 100
    errs = sum(int(r["errors"]) for r in rows if r["variant"] == v)
    print(f"| {v} | {rps:.0f} | {d_rps:+.1f}% | {med(v, 'p50_ms'):.3f} | {med(v, 'p99_ms'):.3f} "
          f"| {cpu:.3f} | {d_cpu:+.1f}% | {errs} |")
EOF
