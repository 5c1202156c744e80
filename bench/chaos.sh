#!/usr/bin/env bash
# bench/chaos.sh: GET load through the gateway over two upstreams while one of them is killed
# and restarted every few seconds; reports the share of failed requests (target: zero).
#
# Upstreams are the project's mock-service (default) or fixed-response nginx instances. The
# gateway under test is meshgate (default), or nginx / HAProxy for comparison. wrk drives a
# bounded run (-d) with a Lua script that counts every non-2xx answer; socket errors (connect,
# read, write, timeout) count as failures too. Exit status 1 when more than --max-failed
# requests failed (default 0), so CI can run it.
#
# Only 127.0.0.1 is loaded. Every process started here is stopped by PID on exit, Ctrl-C or
# SIGTERM. See bench/README.md.
set -euo pipefail

SCRIPT_NAME="bench/chaos.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

DUR=30
CONNS=16
EVERY=3
DOWN=1
TARGET=meshgate
UPSTREAM=mock
SIGNAL=KILL
MAX_FAILED=0
REQ_PATH=/users   # mock-service answers 200 here; fixed-response nginx answers any path
BUILD=1
OUT=""
PORT_BASE=""
MESHGATE_BIN="${MESHGATE_BIN:-}"
# Not passed on: meshgate reads MESHGATE_* variables as configuration ("bin: unknown key").
export -n MESHGATE_BIN
MOCK_BIN="${MOCK_BIN:-}"
PIN=0

usage() {
  cat <<EOF
Usage: bench/chaos.sh [options]

GET load through the gateway while upstream b of two is killed and restarted every few seconds.
Prints the share of failed requests; exits 1 if more than --max-failed failed.

  -d SECS            length of the load run (default $DUR)
  -c N               wrk connections (default $CONNS)
  --every SECS       seconds between kills (default $EVERY)
  --down SECS        seconds the killed upstream stays down before its restart (default $DOWN)
  --signal KILL|TERM how the upstream is stopped (default $SIGNAL: abrupt, in-flight requests die)
  -t meshgate|nginx|haproxy   gateway under test (default $TARGET)
  --upstream mock|nginx       mock = the project's mock-service binary (default); nginx = fixed
                              'ok' responses, needs no build
  --path PATH        request path (default $REQ_PATH; /health and /status are answered by
                     meshgate itself, so don't use those)
  --max-failed N     failed requests allowed before exit status 1 (default $MAX_FAILED)
  --quick            -d 10
  --no-build         do not run cargo; use \$MESHGATE_BIN / \$MOCK_BIN or target/release/
  --port-base N      use ports N..N+3 on 127.0.0.1 (checked free) instead of kernel-chosen ones
  -o DIR             keep configs and logs in DIR (default: a new /tmp dir)
  -h, --help         this help
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -d) DUR="${2:?}"; shift 2 ;;
    -c) CONNS="${2:?}"; shift 2 ;;
    --every) EVERY="${2:?}"; shift 2 ;;
    --down) DOWN="${2:?}"; shift 2 ;;
    --signal) SIGNAL="${2:?}"; shift 2 ;;
    -t) TARGET="${2:?}"; shift 2 ;;
    --upstream) UPSTREAM="${2:?}"; shift 2 ;;
    --path) REQ_PATH="${2:?}"; shift 2 ;;
    --max-failed) MAX_FAILED="${2:?}"; shift 2 ;;
    --quick) DUR=10; shift ;;
    --no-build) BUILD=0; shift ;;
    --port-base) PORT_BASE="${2:?}"; shift 2 ;;
    -o) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/chaos.sh: unknown option: $1 (see -h)" >&2; exit 2 ;;
  esac
done

in_range() { is_uint "$1" && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$DUR" 2 600 || die "-d must be 2..600 seconds"
in_range "$CONNS" 1 4000 || die "-c must be 1..4000"
in_range "$EVERY" 1 60 || die "--every must be 1..60 seconds"
in_range "$DOWN" 0 60 || die "--down must be 0..60 seconds"
in_range "$MAX_FAILED" 0 1000000000 || die "--max-failed must be a number"
[ -z "$PORT_BASE" ] || in_range "$PORT_BASE" 1024 65000 || die "--port-base must be 1024..65000"
case "$SIGNAL" in KILL|TERM) ;; *) die "--signal must be KILL or TERM" ;; esac
case "$TARGET" in meshgate|nginx|haproxy) ;; *) die "-t must be meshgate, nginx or haproxy" ;; esac
case "$UPSTREAM" in mock|nginx) ;; *) die "--upstream must be mock or nginx" ;; esac
case "$REQ_PATH" in /*) ;; *) die "--path must start with /" ;; esac

tools=(curl python3 ps awk timeout wrk)
{ [ "$TARGET" = nginx ] || [ "$UPSTREAM" = nginx ]; } && tools+=(nginx)
[ "$TARGET" = haproxy ] && tools+=(haproxy)
need_tools "${tools[@]}"

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"
need_meshgate=0; need_mock=0
[ "$TARGET" = meshgate ] && [ -z "$MESHGATE_BIN" ] && need_meshgate=1
[ "$UPSTREAM" = mock ] && [ -z "$MOCK_BIN" ] && need_mock=1
if [ "$BUILD" = 1 ] && [ $((need_meshgate + need_mock)) -gt 0 ]; then
  command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, or --no-build with MESHGATE_BIN/MOCK_BIN)"
  log "building (cargo build --release --bins)"
  (cd "$REPO_ROOT" && cargo build --release --bins) || die "cargo build failed"
fi
[ "$need_meshgate" = 1 ] && MESHGATE_BIN="$TARGET_DIR/meshgate"
[ "$need_mock" = 1 ] && MOCK_BIN="$TARGET_DIR/mock-service"
[ "$TARGET" != meshgate ] || [ -x "$MESHGATE_BIN" ] || die "$MESHGATE_BIN not found (build it, or set MESHGATE_BIN)"
[ "$UPSTREAM" != mock ] || [ -x "$MOCK_BIN" ] || die "$MOCK_BIN not found (build it, or set MOCK_BIN)"
if [ "$TARGET" = meshgate ]; then
  while read -r v; do
    case "$v" in MESHGATE_BIN) ;; MESHGATE_*|CONSUL_HTTP_*) unset "$v" ;; esac
  done < <(compgen -e)
fi
raise_nofile 8192
NOFILE="$(ulimit -n)"; [ "$NOFILE" = unlimited ] && NOFILE=65536

[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-chaos.XXXXXX)"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
RUN_DIR="$OUT/run"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www"
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
head -c 1048576 /dev/zero >"$RUN_DIR/www/1m.bin"; chmod 644 "$RUN_DIR/www/1m.bin"

ports="$(free_ports 6 "$PORT_BASE")" || die "could not reserve 6 free ports on 127.0.0.1"
read -r P_BA P_BB P_SA P_SB P_GW P_ADMIN <<<"$ports"
for p in $ports; do need_port_free "$p"; done

case "$TARGET" in
  meshgate) render "$CONF_DIR/chaos-meshgate.toml.in" "$RUN_DIR/gateway.toml" PORT="$P_GW" ADMIN_PORT="$P_ADMIN" BA="$P_BA" BB="$P_BB" ;;
  nginx) render "$CONF_DIR/nginx-proxy.conf.in" "$RUN_DIR/gateway.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" PORT="$P_GW" BA="$P_BA" BB="$P_BB" ;;
  haproxy) render "$CONF_DIR/chaos-haproxy.cfg.in" "$RUN_DIR/gateway.cfg" PORT="$P_GW" BA="$P_BA" BB="$P_BB" ;;
esac
if [ "$UPSTREAM" = nginx ]; then
  render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"
  render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-b.conf" NOFILE="$NOFILE" RUN="$RUN_DIR" NAME=b PORT="$P_BB" STATUS_PORT="$P_SB"
fi

LOAD_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$LOAD_PID" ] && stop_pid "$LOAD_PID" 2
  stop_all
  log "stopped everything this run started; configs and logs: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

declare -A UP_PID=() UP_PORT=([a]="$P_BA" [b]="$P_BB")

start_upstream() { # a|b -> UP_PID, answering (bounded: 15 s)
  local n="$1" url
  if [ "$UPSTREAM" = mock ]; then
    # mock-service binds 0.0.0.0:PORT; we only ever connect to it on 127.0.0.1
    start_bg "upstream-$n" "" "$MOCK_BIN" "${UP_PORT[$n]}" "chaos-$n"
    url="http://127.0.0.1:${UP_PORT[$n]}/health"
  else
    start_bg "upstream-$n" "" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/upstream-$n.err" -c "$RUN_DIR/backend-$n.conf"
    url="http://127.0.0.1:${UP_PORT[$n]}/"
  fi
  UP_PID[$n]="$LAST_PID"
  wait_http "$url" 15 "$LAST_PID" || die "upstream $n did not come up: $(tail -n 3 "$RUN_DIR/logs/upstream-$n.log" 2>/dev/null)"
}

kill_upstream() { # a|b : the signal to the process and its children (nginx workers) at once
  local n="$1" p all=()
  mapfile -t all < <(descendants "${UP_PID[$n]}")
  for p in "${all[@]}"; do kill -"$SIGNAL" "$p" 2>/dev/null || true; done
  stop_pid "${UP_PID[$n]}" 3      # reaps it; SIGKILLs whatever a TERM left behind after 3 s
  forget_pid "${UP_PID[$n]}"
  UP_PID[$n]=""
}

start_upstream a
start_upstream b
case "$TARGET" in
  meshgate) start_bg gateway "" env RUST_LOG=warn "$MESHGATE_BIN" --config "$RUN_DIR/gateway.toml" ;;
  nginx) start_bg gateway "" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/gateway.err" -c "$RUN_DIR/gateway.conf" ;;
  haproxy) start_bg gateway "" haproxy -db -f "$RUN_DIR/gateway.cfg" ;;
esac
GW_PID="$LAST_PID"
URL="http://127.0.0.1:$P_GW$REQ_PATH"
wait_http "$URL" 30 "$GW_PID" || die "$TARGET did not answer 200 on $URL: $(tail -n 5 "$RUN_DIR/logs/gateway.log" 2>/dev/null)"
sleep 1   # let health checks (where configured) see both upstreams up

EVENTS="$OUT/events.log"
: >"$EVENTS"
ev() { printf '%s +%5.1fs %s\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "$(awk -v s="$T0" -v n="$(date +%s.%N)" 'BEGIN { print n - s }')" "$*" | tee -a "$EVENTS" >&2; }

log "chaos: $TARGET over $UPSTREAM upstreams a:$P_BA b:$P_BB; GET $URL with $CONNS connections for ${DUR}s; b gets SIG$SIGNAL every ${EVERY}s, down ${DOWN}s"
T0="$(date +%s.%N)"
LOAD_OUT="$OUT/wrk.txt"
( exec timeout -k 5 $((DUR + 30)) wrk -t1 -c"$CONNS" -d"${DUR}s" --timeout 5s -s "$CONF_DIR/chaos.lua" "$URL" ) >"$LOAD_OUT" 2>&1 </dev/null &
LOAD_PID=$!
kills=0
deadline=$(( $(date +%s) + DUR ))
# the last kill leaves time for the restart before the load ends (bounded by the deadline)
while kill -0 "$LOAD_PID" 2>/dev/null && [ $(( $(date +%s) + EVERY + DOWN + 1 )) -le "$deadline" ]; do
  sleep "$EVERY"
  kill -0 "$LOAD_PID" 2>/dev/null || break
  kill_upstream b; kills=$((kills + 1)); ev "b killed (SIG$SIGNAL)"
  sleep "$DOWN"
  start_upstream b; ev "b restarted and healthy"
done
wait "$LOAD_PID" || true
LOAD_PID=""

line="$(grep '^MESHGATE_CHAOS ' "$LOAD_OUT" || true)"
[ -n "$line" ] || die "no result from wrk (see $LOAD_OUT)"
get() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
reqs="$(get requests)"; non2xx="$(get non2xx)"
sock=$(( $(get connect) + $(get read) + $(get write) + $(get timeout) ))
failed=$((non2xx + sock))
attempted=$((reqs + sock))
share="$(awk -v f="$failed" -v a="$attempted" 'BEGIN { printf "%.4f", (a > 0) ? 100 * f / a : 0 }')"
statuses="$(awk '/^MESHGATE_CHAOS_STATUS/ { printf "%s%s x%s", sep, $2, $3; sep = ", " }' "$LOAD_OUT")"

echo
echo "chaos: $TARGET, upstreams $UPSTREAM; b killed with SIG$SIGNAL $kills time(s), ${DOWN}s down each, over ${DUR}s at $CONNS connections"
echo "requests: $attempted, failed: $failed ($share %) = non-2xx $non2xx${statuses:+ [$statuses]} + socket errors $sock (connect $(get connect), read $(get read), write $(get write), timeout $(get timeout))"
echo "latency: p50 $(awk -v u="$(get p50_us)" 'BEGIN { printf "%.2f", u / 1000 }') ms, p99 $(awk -v u="$(get p99_us)" 'BEGIN { printf "%.2f", u / 1000 }') ms, max $(awk -v u="$(get max_us)" 'BEGIN { printf "%.2f", u / 1000 }') ms"
echo "events: $EVENTS"
if [ "$kills" -eq 0 ]; then
  echo "result: INVALID (no kill happened; make -d longer than --every + --down + 1)"
  exit 1
fi
if [ "$failed" -le "$MAX_FAILED" ]; then
  echo "result: PASS ($failed failed, allowed $MAX_FAILED)"
else
  echo "result: FAIL ($failed failed, allowed $MAX_FAILED; the target for GET is 0)"
  exit 1
fi
