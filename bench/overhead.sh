#!/usr/bin/env bash
# bench/overhead.sh: what observability costs meshgate. Same rig as bench/run.sh (one fast nginx
# upstream, meshgate with one worker pinned to the proxy core, wrk pinned to the load-generator
# core), one keep-alive scenario, and these variants of the same binary and config:
#
#   off        tracing off, access log off, nobody scrapes /metrics (the baseline)
#   trace100   OTLP/HTTP export, every request sampled (parentbased_traceidratio, 1.0)
#   trace1     OTLP/HTTP export, 1 % of requests sampled
#   access     [log] access = "json" (lines to a file)
#   scrape     baseline plus GET /metrics ten times a second during the load
#   nometrics  [metrics] enabled = false: no per-request metric recording (the baseline records)
#
# "off" records metrics (the default); "nometrics" shows what recording costs, "scrape" what
# serving /metrics costs. The /health counters and balancing state are kept either way.
#
# The OTLP collector is a tiny python3 http.server on 127.0.0.1 that reads each POST and
# answers 200 (no decoding). Requests carry no traceparent, so the root sampler decides.
# Only 127.0.0.1 is listened on and loaded; everything started here is stopped by PID on exit.
set -euo pipefail

SCRIPT_NAME="bench/overhead.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

ROUNDS=3
DUR=10
WARMUP=2
CONNS=50
VARIANTS="off,trace100,trace1,access,scrape,nometrics"
BUILD=1
OUT=""
LG_CPU=""; PROXY_CPU=""
MESHGATE_BIN="${MESHGATE_BIN:-}"
# Not passed on: meshgate reads MESHGATE_* variables as configuration ("bin: unknown key").
export -n MESHGATE_BIN

usage() {
  cat <<EOF
Usage: bench/overhead.sh [options]

Throughput and CPU of meshgate with tracing (100 % and 1 % sampled), the access log, and
/metrics scraping, against the same gateway with all of them off. Prints a markdown table of
medians over interleaved rounds. A default run takes about 4 minutes, --quick about 40 s
(plus the release build).

  -r N          interleaved rounds (default $ROUNDS)
  -d SECS       seconds per measured run (default $DUR)
  -w SECS       warm-up per run, not recorded (default $WARMUP)
  -c N          keep-alive connections (default $CONNS)
  -v LIST       variants, comma separated (default $VARIANTS)
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
    -v) VARIANTS="$2"; shift 2 ;;
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
for v in "${VARS[@]}"; do
  case "$v" in off|trace100|trace1|access|scrape|nometrics) ;; *) die "unknown variant '$v'" ;; esac
done

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

[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-overhead.XXXXXX)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www" "$RAW"
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
: >"$RUN_DIR/www/1m.bin"
raise_nofile 4096

ports="$(free_ports 5)" || die "could not reserve free ports on 127.0.0.1"
read -r P_BA P_SA P_MESHGATE P_ADMIN P_SINK <<<"$ports"
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE=4096 RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"
# The run.sh config with both targets on the one upstream.
render "$CONF_DIR/meshgate.toml.in" "$RUN_DIR/meshgate.toml" PORT="$P_MESHGATE" ADMIN_PORT="$P_ADMIN" BA="$P_BA" BB="$P_BA"

LOAD_PID=""
SCRAPE_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$LOAD_PID" ] && stop_pid "$LOAD_PID" 2
  [ -n "$SCRAPE_PID" ] && stop_pid "$SCRAPE_PID" 2
  stop_all
  log "stopped everything this run started; configs, logs and raw output: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- upstream and OTLP sink
start_bg backend-a "$LG_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-a.err" -c "$RUN_DIR/backend-a.conf"
wait_http "http://127.0.0.1:$P_BA/" 30 "$LAST_PID" || die "upstream did not start (see $RUN_DIR/logs)"

cat >"$RUN_DIR/otlp-sink.py" <<'EOF'
# Answers every POST with 200 and an empty body after reading it; counts bytes and requests.
import http.server, sys, threading
stats = {"posts": 0, "bytes": 0}
lock = threading.Lock()
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        with lock:
            stats["posts"] += 1; stats["bytes"] += n
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        with lock:
            body = f'{stats["posts"]} {stats["bytes"]}\n'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
EOF
start_bg otlp-sink "$LG_CPU" python3 "$RUN_DIR/otlp-sink.py" "$P_SINK"
wait_http "http://127.0.0.1:$P_SINK/" 30 "$LAST_PID" || die "OTLP sink did not start"

# ---------------------------------------------------------------- one measured run
variant_env() { # VARIANT -> env assignments for meshgate
  local sink="OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$P_SINK"
  case "$1" in
    off|scrape) ;;
    trace100) echo "$sink OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=1.0" ;;
    trace1) echo "$sink OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01" ;;
    access) echo "MESHGATE_LOG__ACCESS=json" ;;
    nometrics) echo "MESHGATE_METRICS__ENABLED=false" ;;
  esac
}

metric() { # NAME -> value from /metrics (0 when absent)
  curl -s --max-time 2 "http://127.0.0.1:$P_ADMIN/metrics" \
    | awk -v m="$1" '$1 == m { print $2; found = 1 } END { if (!found) print 0 }'
}

TSV="$OUT/results.tsv"
printf 'variant\tround\treq_s\tp50_ms\tp99_ms\tcpu_s_per_100k\terrors\tspans_exported\tspans_dropped\n' >"$TSV"

measure() { # VARIANT ROUND
  local v="$1" r="$2" f="$RAW/$1-r$2.txt" pid cpu0 cpu1
  # shellcheck disable=SC2046
  start_bg "meshgate-$v" "$PROXY_CPU" env MESHGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    MESHGATE_SERVER__DRAIN_DELAY=0s \
    $(variant_env "$v") "$MESHGATE_BIN" --config "$RUN_DIR/meshgate.toml"
  pid="$LAST_PID"
  wait_http "http://127.0.0.1:$P_MESHGATE/" 30 "$pid" || die "meshgate ($v) did not start (see $RUN_DIR/logs/meshgate-$v.log)"
  local url="http://127.0.0.1:$P_MESHGATE/"
  local wrk=(wrk -t1 -c"$CONNS" --timeout 10s -s "$CONF_DIR/wrk-report.lua")
  [ "$PIN" = 1 ] && wrk=(taskset -c "$LG_CPU" "${wrk[@]}")
  if [ "$WARMUP" -gt 0 ]; then
    timeout -k 5 $((WARMUP + 30)) "${wrk[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 </dev/null || true
  fi
  if [ "$v" = scrape ]; then
    # On the load-generator core, so the scraper's own CPU does not land on the proxy's.
    local pin=()
    [ "$PIN" = 1 ] && pin=(taskset -c "$LG_CPU")
    ( for ((i = 0; i < (DUR + 5) * 10; i++)); do
        "${pin[@]}" curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$P_ADMIN/metrics" || true
        sleep 0.1
      done ) </dev/null >/dev/null 2>&1 &
    SCRAPE_PID=$!
  fi
  cpu0="$(cpu_ticks "$pid")"
  ( exec timeout -k 5 $((DUR + 30)) "${wrk[@]}" -d"${DUR}s" "$url" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || true
  LOAD_PID=""
  cpu1="$(cpu_ticks "$pid")"
  if [ -n "$SCRAPE_PID" ]; then stop_pid "$SCRAPE_PID" 1; SCRAPE_PID=""; fi
  local exported dropped
  exported="$(metric meshgate_trace_spans_exported_total)"
  dropped="$(metric meshgate_trace_spans_dropped_total)"
  stop_pid "$pid" 5
  forget_pid "$pid"
  awk -v v="$v" -v r="$r" -v d=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v ex="$exported" -v dr="$dropped" '
    /^MESHGATE_BENCH / {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); x[kv[1]] = kv[2] }
      n = x["requests"]; s = x["duration_us"] / 1e6
      printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.3f\t%d\t%s\t%s\n", v, r, (s > 0) ? n / s : 0,
        x["p50_us"] / 1000, x["p99_us"] / 1000, (n > 0) ? d / hz / n * 100000 : 0,
        x["connect"] + x["read"] + x["write"] + x["status"] + x["timeout"], ex, dr
    }' "$f" | tee -a "$TSV" | awk -F'\t' '{ printf "[run] %-9s r%s %8s req/s  p50 %s  p99 %s ms  cpu %s s/100k  err %s  spans %s exported / %s dropped\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }' >&2
}

log "variants: ${VARS[*]}; $ROUNDS round(s) of ${DUR}s at $CONNS connections; output in $OUT"
for ((r = 1; r <= ROUNDS; r++)); do
  # Rotate the order each round so slow phases of the machine hit every variant alike.
  n="${#VARS[@]}"
  for ((i = 0; i < n; i++)); do
    measure "${VARS[$(( (i + r - 1) % n ))]}" "$r"
    sleep 1
  done
done

# ---------------------------------------------------------------- summary
python3 - "$TSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
order = []
for r in rows:
    if r["variant"] not in order:
        order.append(r["variant"])
med = lambda v, k: statistics.median(float(r[k]) for r in rows if r["variant"] == v)
base = "off" if "off" in order else order[0]
print(f"\n| variant | req/s | vs {base} | p50 ms | p99 ms | CPU s/100k req | vs {base} | spans exported / dropped (last round) |")
print("|---|---|---|---|---|---|---|---|")
for v in order:
    last = [r for r in rows if r["variant"] == v][-1]
    rps, cpu = med(v, "req_s"), med(v, "cpu_s_per_100k")
    d_rps = (rps / med(base, "req_s") - 1) * 100
    d_cpu = (cpu / med(base, "cpu_s_per_100k") - 1) * 100
    print(f"| {v} | {rps:.0f} | {d_rps:+.1f}% | {med(v, 'p50_ms'):.3f} | {med(v, 'p99_ms'):.3f} "
          f"| {cpu:.3f} | {d_cpu:+.1f}% | {last['spans_exported']} / {last['spans_dropped']} |")
EOF
