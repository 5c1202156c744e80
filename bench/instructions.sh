#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions per request of meshgate, nginx and HAProxy
# doing the same work, counted by callgrind: a deterministic figure next to run.sh's wall clock.
#
# Each proxy runs alone under `valgrind --tool=callgrind` (one worker, pinned to the proxy core)
# in front of the same two nginx upstreams as bench/run.sh, from the same configs. A fixed-count
# keep-alive client (Python, standard library) sends -W warm-up requests; callgrind's counters
# are then zeroed (callgrind_control -z), -n measured requests follow, and the counters are
# dumped (callgrind_control -d). Figure = instructions (Ir) of the whole proxy process / -n.
# Every target is measured -k times, interleaved, and the table shows how far the runs agree.
#
# Only 127.0.0.1 is listened on. Every process started here is stopped by PID on exit.
set -euo pipefail

SCRIPT_NAME="bench/instructions.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

N=20000             # measured requests per run
WARM=2000           # warm-up requests per run, not counted
CONNS=10            # client connections
REPEATS=2           # runs per target
TOP=12              # functions listed per target by exclusive instructions per request
TARGETS="meshgate,nginx,haproxy"
BUILD=1
RECORD=1
OUT=""
NOTE=""
LG_CPU=0; PROXY_CPU=1; BACKEND_CPU=0
MESHGATE_BIN="${MESHGATE_BIN:-}"
export -n MESHGATE_BIN
CMDLINE="bench/instructions.sh$(quote_args "$@")"

usage() {
  cat <<EOF
Usage: bench/instructions.sh [options]

User-space instructions per request (callgrind) of meshgate, nginx and HAProxy proxying the same
keep-alive GETs to the same two nginx upstreams, one worker each. Prints a table and appends it
to bench/RESULTS.md. About 15–30 s per run and target (valgrind slows a proxy ~50 times).

  -n N          measured requests per run (default $N)
  -W N          warm-up requests per run before the counters are zeroed (default $WARM)
  -c N          client connections, keep-alive (default $CONNS)
  -k N          runs per target, interleaved (default $REPEATS)
  --top N       list each target's N costliest functions (exclusive instructions per
                request, from its first run; default $TOP, 0 = none)
  -t LIST       targets, comma separated: meshgate, nginx, haproxy (default $TARGETS)
  --no-build    do not run cargo; use \$MESHGATE_BIN or target/release/meshgate
  --no-record   print the table but do not append it to bench/RESULTS.md
  --note TEXT   a note recorded with the results
  --no-pin      do not pin with taskset (instruction counts do not depend on it)
  -o DIR        keep configs, logs and callgrind files in DIR (default: a new /tmp dir)
  -h, --help    this help

Needs valgrind (callgrind_control comes with it), nginx, haproxy, curl, python3; missing Debian
packages are installed with apt-get.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -n) N="${2:?}"; shift 2 ;;
    -W) WARM="${2:?}"; shift 2 ;;
    -c) CONNS="${2:?}"; shift 2 ;;
    -k) REPEATS="${2:?}"; shift 2 ;;
    --top) TOP="${2:?}"; shift 2 ;;
    -t) TARGETS="${2:?}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-record) RECORD=0; shift ;;
    --note) NOTE="${2:?}"; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    -o) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/instructions.sh: unknown option: $1 (see -h)" >&2; exit 2 ;;
  esac
done

in_range() { is_uint "$1" && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$N" 100 10000000 || die "-n must be 100..10000000"
in_range "$WARM" 1 10000000 || die "-W must be 1..10000000"
in_range "$CONNS" 1 1000 || die "-c must be 1..1000"
in_range "$REPEATS" 1 20 || die "-k must be 1..20"
in_range "$TOP" 0 100 || die "--top must be 0..100"
IFS=',' read -r -a TARGET_LIST <<<"$TARGETS"
declare -A SEEN=()
for t in "${TARGET_LIST[@]}"; do
  case "$t" in meshgate|nginx|haproxy) ;; *) die "unknown target '$t' (meshgate, nginx, haproxy)" ;; esac
  [ -z "${SEEN[$t]:-}" ] || die "target $t given twice"
  SEEN[$t]=1
done
has_target() { [ -n "${SEEN[$1]:-}" ]; }
[ "$(nproc)" -ge 2 ] || PIN=0

tools=(curl python3 taskset nginx valgrind callgrind_control)
has_target haproxy && tools+=(haproxy)
need_tools "${tools[@]}"

if has_target meshgate; then
  if [ -n "$MESHGATE_BIN" ]; then
    [ -x "$MESHGATE_BIN" ] || die "MESHGATE_BIN=$MESHGATE_BIN is not an executable"
  else
    MESHGATE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/meshgate"
    if [ "$BUILD" = 1 ]; then
      command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, or pass --no-build with MESHGATE_BIN)"
      log "building meshgate (cargo build --release --bin meshgate)"
      (cd "$REPO_ROOT" && cargo build --release --bin meshgate) || die "cargo build failed"
    fi
    [ -x "$MESHGATE_BIN" ] || die "$MESHGATE_BIN not found (build it, or set MESHGATE_BIN)"
  fi
  while read -r v; do
    case "$v" in MESHGATE_BIN) ;; MESHGATE_*|CONSUL_HTTP_*) unset "$v" ;; esac
  done < <(compgen -e)
fi

# ---------------------------------------------------------------- run dir, ports, configs
[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-instr.XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www" "$RAW"
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
: >"$RUN_DIR/www/1m.bin"; chmod 644 "$RUN_DIR/www/1m.bin"

ports="$(free_ports 8)" || die "could not reserve 8 free ports on 127.0.0.1"
read -r P_BA P_BB P_SA P_SB P_NGINX P_HAPROXY P_MESHGATE P_ADMIN <<<"$ports"
NOFILE="$(ulimit -n)"; [ "$NOFILE" = unlimited ] && NOFILE=65536
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-b.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" NAME=b PORT="$P_BB" STATUS_PORT="$P_SB"
render "$CONF_DIR/nginx-proxy.conf.in" "$RUN_DIR/nginx-proxy.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" PORT="$P_NGINX" BA="$P_BA" BB="$P_BB"
# One process instead of master + one worker, so callgrind watches the process that does the
# work; the worker's event loop and request path are the same code.
sed -i 's/^worker_processes 1;/worker_processes 1;\nmaster_process off;/' "$RUN_DIR/nginx-proxy.conf"
grep -q '^master_process off;' "$RUN_DIR/nginx-proxy.conf" || die "could not set master_process off"
render "$CONF_DIR/haproxy.cfg.in" "$RUN_DIR/haproxy.cfg" PORT="$P_HAPROXY" BA="$P_BA" BB="$P_BB" WORKERS=1
render "$CONF_DIR/meshgate.toml.in" "$RUN_DIR/meshgate.toml" PORT="$P_MESHGATE" ADMIN_PORT="$P_ADMIN" BA="$P_BA" BB="$P_BB"
declare -A PORT=([nginx]="$P_NGINX" [haproxy]="$P_HAPROXY" [meshgate]="$P_MESHGATE")

LOAD_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$LOAD_PID" ] && stop_pid "$LOAD_PID" 2
  stop_all
  log "stopped everything this run started; configs, logs and callgrind files: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if has_target meshgate; then
  "$MESHGATE_BIN" check --config "$RUN_DIR/meshgate.toml" >"$RUN_DIR/logs/meshgate-check.log" 2>&1 \
    || die "meshgate check rejected $RUN_DIR/meshgate.toml: $(tail -n 5 "$RUN_DIR/logs/meshgate-check.log")"
fi

# ---------------------------------------------------------------- the fixed-count client
CLIENT="$RUN_DIR/fixed-load.py"
cat >"$CLIENT" <<'EOF'
# fixed-load.py PORT TOTAL CONNS DEADLINE_SECS: exactly TOTAL keep-alive GET / over CONNS
# connections (one request in flight per connection); prints "DONE ok=.. errors=.. secs=..".
import selectors, socket, sys, time

port, total, conns, deadline = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench-instructions\r\n\r\n"
end = time.monotonic() + deadline


class Conn:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.setblocking(False)
        self.buf = b""

    def responses(self, data):
        """Complete responses now in the buffer: a list of 'status was 200'."""
        self.buf += data
        done = []
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return done
            head = self.buf[:i].decode("latin-1").split("\r\n")
            length = None
            for line in head[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v.strip())
                elif k == "transfer-encoding":
                    sys.exit("chunked response: this client reads Content-Length bodies only")
            if length is None:
                sys.exit("response without Content-Length: " + head[0])
            if len(self.buf) < i + 4 + length:
                return done
            done.append(head[0].split(" ")[1] == "200")
            self.buf = self.buf[i + 4 + length:]


sel = selectors.DefaultSelector()
sent = ok = bad = 0
t0 = time.monotonic()
for _ in range(min(conns, total)):
    c = Conn()
    sel.register(c.s, selectors.EVENT_READ, c)
    c.s.sendall(REQ)
    sent += 1
while ok + bad < total:
    if time.monotonic() > end:
        sys.exit(f"deadline passed after {ok + bad} of {total} responses")
    for key, _ in sel.select(timeout=1):
        c = key.data
        data = c.s.recv(65536)
        if not data:
            sys.exit(f"connection closed by the proxy after {ok + bad} responses")
        for good in c.responses(data):
            ok += good
            bad += not good
            if sent < total:
                c.s.sendall(REQ)
                sent += 1
print(f"DONE ok={ok} errors={bad} secs={time.monotonic() - t0:.3f}")
EOF

# client TARGET COUNT OUTFILE : COUNT requests, bounded in time; fails unless all were answered
client() {
  local t="$1" n="$2" f="$3" cmd
  cmd=(python3 "$CLIENT" "${PORT[$t]}" "$n" "$CONNS" $((60 + n / 50)))
  [ "$PIN" = 1 ] && cmd=(taskset -c "$LG_CPU" "${cmd[@]}")
  ( exec timeout -k 5 $((90 + n / 50)) "${cmd[@]}" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || die "client against $t failed: $(tail -n 3 "$f")"
  LOAD_PID=""
  grep -q "^DONE ok=$n errors=0 " "$f" || die "client against $t: not all $n answered 200: $(tail -n 1 "$f")"
}

# ---------------------------------------------------------------- measurement
LOAD_START="$(load_line)"
start_bg backend-a "$BACKEND_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-a.err" -c "$RUN_DIR/backend-a.conf"
BACKEND_A_PID=$LAST_PID
start_bg backend-b "$BACKEND_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-b.err" -c "$RUN_DIR/backend-b.conf"
wait_http "http://127.0.0.1:$P_BA/" 15 "$BACKEND_A_PID" || die "upstream a did not start (see $RUN_DIR/logs)"
wait_http "http://127.0.0.1:$P_BB/" 15 || die "upstream b did not start (see $RUN_DIR/logs)"

TSV="$OUT/results.tsv"
printf 'target\trun\trequests\tir_total\tir_per_request\n' >"$TSV"

measure() { # TARGET RUN
  local t="$1" k="$2" cg="$RAW/callgrind.$1.$2" vg cmd=() pid ir
  vg=(valgrind --tool=callgrind --callgrind-out-file="$cg" --dump-instr=no --compress-strings=no)
  case "$t" in
    nginx) cmd=(nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/nginx-proxy.err" -c "$RUN_DIR/nginx-proxy.conf") ;;
    haproxy) cmd=(haproxy -db -f "$RUN_DIR/haproxy.cfg") ;;
    meshgate) cmd=(env MESHGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn "${vg[@]}"
                   "$MESHGATE_BIN" --config "$RUN_DIR/meshgate.toml"); vg=() ;;
  esac
  # env execs valgrind, taskset execs env: the PID started is valgrind's (the proxy's)
  start_bg "$t-$k" "$PROXY_CPU" "${vg[@]}" "${cmd[@]}"
  pid="$LAST_PID"
  wait_http "http://127.0.0.1:${PORT[$t]}/" 120 "$pid" \
    || die "$t under callgrind did not answer 200 within 120 s: $(tail -n 5 "$RUN_DIR/logs/$t-$k.log")"
  client "$t" "$WARM" "$RAW/client-$t-$k-warmup.txt"
  callgrind_control -z "$pid" >"$RAW/control-$t-$k.txt" 2>&1 || die "callgrind_control -z $pid failed"
  client "$t" "$N" "$RAW/client-$t-$k.txt"
  callgrind_control -d "$pid" >>"$RAW/control-$t-$k.txt" 2>&1 || die "callgrind_control -d $pid failed"
  stop_pid "$pid" 10
  forget_pid "$pid"
  # the dump requested after the measured requests is the file with the suffix .1
  [ -f "$cg.1" ] || die "no callgrind dump $cg.1 (see $RAW/control-$t-$k.txt)"
  ir="$(awk '$1 == "summary:" { print $2; exit }' "$cg.1")"
  is_uint "$ir" || die "no summary line in $cg.1"
  printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$k" "$N" "$ir" "$((ir / N))" >>"$TSV"
  log "$(printf '%-8s run %s: %s instructions for %s requests = %s per request' "$t" "$k" "$ir" "$N" "$((ir / N))")"
}

log "targets: ${TARGET_LIST[*]}; $REPEATS run(s) each of $WARM warm-up + $N measured requests over $CONNS connections; output: $OUT"
for k in $(seq 1 "$REPEATS"); do
  # rotate the order from run to run, like bench/run.sh's rounds
  n_t=${#TARGET_LIST[@]}
  for ((i = 0; i < n_t; i++)); do measure "${TARGET_LIST[$(( (i + k - 1) % n_t ))]}" "$k"; done
done

# ---------------------------------------------------------------- report
per_req() { awk -F'\t' -v t="$1" 'NR > 1 && $1 == t { print $5 }' "$TSV"; }
# thousands separators without relying on the locale: 19976 -> 19,976
commas() { sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|[^0-9]\)/\1,\2\3/' -e 'ta'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit }
  if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A MED=()
for t in "${TARGET_LIST[@]}"; do MED[$t]="$(per_req "$t" | median)"; done

table() {
  local t runs spread
  echo "| target | instructions per request, each run | spread (max-min)/min | median |"
  echo "|---|---|---:|---:|"
  for t in "${TARGET_LIST[@]}"; do
    runs="$(per_req "$t" | commas | paste -sd/ | sed 's#/# / #g')"
    spread="$(per_req "$t" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f %%", lo ? 100 * (hi - lo) / lo : 0 }')"
    printf '| %s | %s | %s | %s |\n' "$t" "$runs" "$spread" "$(awk -v v="${MED[$t]}" 'BEGIN { printf "%d\n", v }' | commas)"
  done
  if has_target meshgate; then
    for t in nginx haproxy; do
      has_target "$t" || continue
      printf '| **meshgate/%s** | | | %s |\n' "$t" "$(awk -v a="${MED[meshgate]}" -v b="${MED[$t]}" 'BEGIN { printf "%.2f", a / b }')"
    done
  fi
}

# top_functions CALLGRIND_FILE N REQUESTS : "Ir-per-request<TAB>share %<TAB>function", costliest
# first, by exclusive cost (what the function itself executed, callees not included)
top_functions() {
  python3 - "$@" <<'EOF'
import collections, sys
path, n, reqs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cost, fn, skip = collections.Counter(), None, False
for line in open(path, errors="replace"):
    if skip:                      # the line after calls= is the callee's inclusive cost
        skip = False
    elif line.startswith("fn="):
        fn = line[3:].strip()
    elif line.startswith("calls="):
        skip = True
    elif fn is not None and line[:1] in "0123456789+-*":
        parts = line.split()      # position (absolute, +N, -N or *) then the cost
        if len(parts) >= 2 and parts[1].isdigit():
            cost[fn] += int(parts[1])
total = sum(cost.values()) or 1
for f, c in cost.most_common(n):
    f = f.replace("|", "/")
    print(f"{c / reqs:.0f}\t{100 * c / total:.1f}\t{f if len(f) <= 90 else f[:87] + '...'}")
EOF
}

SUMMARY="$OUT/summary.md"
{
  echo "### $(date -u '+%Y-%m-%d %H:%M:%S UTC') · commit $(commit_line) · instructions per request (callgrind)"
  echo
  echo "- machine: $(machine_line)"
  vs="nginx $(nginx -v 2>&1 | sed 's#.*nginx/##')"
  has_target haproxy && vs="$vs, HAProxy $(haproxy -v 2>/dev/null | awk 'NR == 1 { print $3 }')"
  vs="$vs, $(valgrind --version)"
  has_target meshgate && vs="$vs, meshgate binary $MESHGATE_BIN"
  echo "- versions: $vs"
  echo "- machine load (other work on this shared machine): $LOAD_START at the start, $(load_line) at the end"
  echo "- command: \`$CMDLINE\`"
  echo "- method: each proxy alone under callgrind, one worker (nginx: master_process off), same configs and upstreams as bench/run.sh; $WARM warm-up requests, counters zeroed, then $N keep-alive GET / over $CONNS connections; instructions (Ir, user space, all threads of the proxy process) / $N; $REPEATS interleaved run(s) per target"
  [ -n "$NOTE" ] && echo "- note: $NOTE"
  echo
  table
  if [ "$TOP" -gt 0 ]; then
    for t in "${TARGET_LIST[@]}"; do
      echo
      echo "Costliest functions of $t (exclusive instructions per request, run 1; hex = no symbol):"
      echo
      echo "| Ir/req | share | function |"
      echo "|---:|---:|---|"
      top_functions "$RAW/callgrind.$t.1.1" "$TOP" "$N" | awk -F'\t' '{ printf "| %s | %s %% | `%s` |\n", $1, $2, $3 }'
    done
  fi
} >"$SUMMARY"

echo
cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
  { echo; cat "$SUMMARY"; } >>"$BENCH_DIR/RESULTS.md"
  log "appended to bench/RESULTS.md"
else
  log "not recorded (--no-record)"
fi
