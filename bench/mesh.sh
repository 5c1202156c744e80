#!/usr/bin/env bash
# bench/mesh.sh: what the service mesh costs (issue #13). One gateway, four routes to the same
# fixed nginx answer: plain HTTP and mTLS to a Connect "sidecar", each pooled and with a new
# upstream connection per request. Interleaved rounds of wrk; req/s, latency and the gateway's
# CPU per request; the table is printed and appended to bench/RESULTS.md.
#
# Only 127.0.0.1 is listened on and loaded. Every process started here is stopped by PID on
# exit, Ctrl-C or SIGTERM. Every wait and every load run is bounded in time.
set -euo pipefail

SCRIPT_NAME="bench/mesh.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

# ---------------------------------------------------------------- defaults
ROUNDS=5
DUR=10
WARMUP=2
CONNS=50
ALL_SCENARIOS="plain,mesh,mesh-fresh,plain-fresh"
SCENARIOS="$ALL_SCENARIOS"
BUILD=1
RECORD=1
OUT=""
NOTE=""
PAUSE=1
LG_CPU=""; PROXY_CPU=""; BACKEND_CPU=""
MESHGATE_BIN="${MESHGATE_BIN:-}"
export -n MESHGATE_BIN   # meshgate reads MESHGATE_* as configuration
CMDLINE="bench/mesh.sh${*:+ $*}"

usage() {
  cat <<EOF
Usage: bench/mesh.sh [options]

The cost of the service mesh: one meshgate (one worker, pinned) with four routes to the same
fixed nginx answer, its identity and mesh endpoints served by bench/mesh/consul_stub.py:

  plain        targets = nginx over plain HTTP/1.1, pooled keep-alive
  mesh         connect = true to service web: nginx sidecar terminating mTLS, pooled keep-alive
  mesh-fresh   connect = true to service web-fresh: the sidecar closes after every request and
               never resumes a TLS session, so every request pays a full mTLS handshake
  plain-fresh  plain HTTP/1.1 upstream that closes after every request (reference for mesh-fresh)

wrk keeps its own connections to the gateway alive in every scenario; only the upstream side
differs. Prints medians of interleaved rounds and appends them to bench/RESULTS.md.

  -r N            interleaved rounds (default $ROUNDS)
  -d SECS         seconds per measured run (default $DUR)
  -w SECS         warm-up per scenario, not recorded (default $WARMUP; 0 = none)
  -c N            wrk connections (default $CONNS)
  -s LIST         scenarios, comma separated (default $ALL_SCENARIOS)
  --no-build      do not run cargo; use \$MESHGATE_BIN or target/release/meshgate
  --no-record     print the table but do not append it to bench/RESULTS.md
  --note TEXT     a note recorded with the results
  --no-pin        do not pin with taskset
  --lg-cpu N --proxy-cpu N --backend-cpu N
                  core placement (default with 2 cores: 0 / 1 / 0; with 3+: 0 / 1 / 2)
  -o DIR          keep configs, certificates, logs and raw outputs in DIR (default: new /tmp dir)
  -h, --help      this help

Environment: MESHGATE_BIN=path skips the build. Needs wrk, nginx, openssl, curl, taskset,
python3; missing Debian packages are installed with apt-get (as root or via sudo).
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="${2:?}"; shift 2 ;;
    -d) DUR="${2:?}"; shift 2 ;;
    -w) WARMUP="${2:?}"; shift 2 ;;
    -c) CONNS="${2:?}"; shift 2 ;;
    -s) SCENARIOS="${2:?}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-record) RECORD=0; shift ;;
    --note) NOTE="${2:?}"; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --lg-cpu) LG_CPU="${2:?}"; shift 2 ;;
    --proxy-cpu) PROXY_CPU="${2:?}"; shift 2 ;;
    --backend-cpu) BACKEND_CPU="${2:?}"; shift 2 ;;
    -o) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/mesh.sh: unknown option: $1 (see -h)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- validate options
in_range() { is_uint "$1" && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$ROUNDS" 1 50 || die "-r must be 1..50"
in_range "$DUR" 1 300 || die "-d must be 1..300 seconds"
in_range "$WARMUP" 0 60 || die "-w must be 0..60 seconds"
in_range "$CONNS" 1 10000 || die "-c must be 1..10000"
SCEN_LIST=()
IFS=',' read -r -a wanted <<<"$SCENARIOS"
for s in "${wanted[@]}"; do
  case ",$ALL_SCENARIOS," in *",$s,"*) SCEN_LIST+=("$s") ;; *) die "unknown scenario: '$s' (known: $ALL_SCENARIOS)" ;; esac
done
[ "${#SCEN_LIST[@]}" -gt 0 ] || die "no scenario given"
has_scen() { case " ${SCEN_LIST[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

NCPU="$(nproc)"
if [ "$PIN" = 1 ] && [ "$NCPU" -lt 2 ]; then log "only one core: running unpinned"; PIN=0; fi
LG_CPU="${LG_CPU:-0}"; PROXY_CPU="${PROXY_CPU:-1}"
if [ -z "$BACKEND_CPU" ]; then if [ "$NCPU" -ge 3 ]; then BACKEND_CPU=2; else BACKEND_CPU=0; fi; fi
if [ "$PIN" = 1 ]; then
  for c in "$LG_CPU" "$PROXY_CPU" "$BACKEND_CPU"; do
    in_range "$c" 0 $((NCPU - 1)) || die "core $c does not exist (nproc = $NCPU)"
  done
fi

# ---------------------------------------------------------------- tools, meshgate binary
need_tools curl taskset python3 ps awk timeout nginx wrk openssl

if [ -n "$MESHGATE_BIN" ]; then
  [ -x "$MESHGATE_BIN" ] || die "MESHGATE_BIN=$MESHGATE_BIN is not an executable"
else
  MESHGATE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/meshgate"
  if [ "$BUILD" = 1 ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, or pass --no-build with MESHGATE_BIN)"
    log "building meshgate (cargo build --release --bin meshgate) before any measurement"
    (cd "$REPO_ROOT" && cargo build --release --bin meshgate) || die "cargo build failed"
  fi
  [ -x "$MESHGATE_BIN" ] || die "$MESHGATE_BIN not found (build it, or set MESHGATE_BIN)"
fi
# Settings from the caller's environment must not change the benchmarked config.
while read -r v; do
  case "$v" in MESHGATE_BIN) ;; MESHGATE_*|CONSUL_HTTP_*) unset "$v" ;; esac
done < <(compgen -e)

raise_nofile $((CONNS * 4 + 1024))
NOFILE="$(ulimit -n)"; [ "$NOFILE" = unlimited ] && NOFILE=65536

# ---------------------------------------------------------------- run dir, certificates, configs
[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-mesh-bench.XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
CERTS="$RUN_DIR/certs"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RAW"
chmod 755 "$OUT" "$RUN_DIR"   # nginx started as root runs its worker as nobody

TRUST_DOMAIN="$(cat /proc/sys/kernel/random/uuid).consul"
DC=dc1
"$BENCH_DIR/mesh/certs.sh" "$CERTS" "$TRUST_DOMAIN" "$DC" >"$RUN_DIR/logs/certs.log" 2>&1 \
  || die "certificate generation failed: $(tail -n 5 "$RUN_DIR/logs/certs.log")"
chmod 755 "$CERTS"
rfc3339() { date -u -d "$1" +%Y-%m-%dT%H:%M:%SZ; }
LEAF_AFTER="$(rfc3339 "$(openssl x509 -in "$CERTS/meshgate.pem" -noout -startdate | cut -d= -f2)")"
LEAF_BEFORE="$(rfc3339 "$(openssl x509 -in "$CERTS/meshgate.pem" -noout -enddate | cut -d= -f2)")"
LEAF_SERIAL="$(openssl x509 -in "$CERTS/meshgate.pem" -noout -serial | cut -d= -f2 | sed 's/../&:/g; s/:$//' | tr 'A-F' 'a-f')"

ports="$(free_ports 7)" || die "could not reserve 7 free ports on 127.0.0.1"
read -r P_PLAIN P_WEB P_WEB_FRESH P_PLAIN_FRESH P_STATUS P_GW P_ADMIN <<<"$ports"

render "$CONF_DIR/mesh-upstreams.conf.in" "$RUN_DIR/upstreams.conf" RUN="$RUN_DIR" NOFILE="$NOFILE" \
  CERTS="$CERTS" P_PLAIN="$P_PLAIN" P_WEB="$P_WEB" P_WEB_FRESH="$P_WEB_FRESH" \
  P_PLAIN_FRESH="$P_PLAIN_FRESH" P_STATUS="$P_STATUS"

LOAD_PID=""
GW_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$LOAD_PID" ] && stop_pid "$LOAD_PID" 2
  # the gateway first: stopped after the Consul stub, it would log its watches failing
  [ -n "$GW_PID" ] && stop_pid "$GW_PID" 3
  stop_all
  log "stopped everything this run started; configs, logs and raw output: $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- start
start_bg upstreams "$BACKEND_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/upstreams.err" -c "$RUN_DIR/upstreams.conf"
UP_PID=$LAST_PID
wait_http "http://127.0.0.1:$P_STATUS/" 15 "$UP_PID" \
  || die "nginx upstreams did not start: $(tail -n 5 "$RUN_DIR/logs/upstreams.err" 2>/dev/null)"

start_bg consul-stub "$BACKEND_CPU" python3 "$BENCH_DIR/mesh/consul_stub.py" --verbose \
  --port-file "$RUN_DIR/consul.port" --ca "$CERTS/ca.pem" \
  --leaf-cert "$CERTS/meshgate.pem" --leaf-key "$CERTS/meshgate.key" --leaf-serial "$LEAF_SERIAL" \
  --valid-after "$LEAF_AFTER" --valid-before "$LEAF_BEFORE" --trust-domain "$TRUST_DOMAIN" \
  --identity meshgate --dc "$DC" \
  --service "web=127.0.0.1:$P_WEB" --service "web-fresh=127.0.0.1:$P_WEB_FRESH"
STUB_PID=$LAST_PID
for ((i = 0; i < 100; i++)); do
  [ -s "$RUN_DIR/consul.port" ] && break
  kill -0 "$STUB_PID" 2>/dev/null || break
  sleep 0.1
done
[ -s "$RUN_DIR/consul.port" ] || die "the Consul stub did not start: $(tail -n 5 "$RUN_DIR/logs/consul-stub.log")"
CONSUL_PORT="$(cat "$RUN_DIR/consul.port")"

render "$CONF_DIR/mesh-meshgate.toml.in" "$RUN_DIR/meshgate.toml" PORT="$P_GW" ADMIN_PORT="$P_ADMIN" \
  CONSUL_PORT="$CONSUL_PORT" P_PLAIN="$P_PLAIN" P_PLAIN_FRESH="$P_PLAIN_FRESH"
"$MESHGATE_BIN" check --config "$RUN_DIR/meshgate.toml" >"$RUN_DIR/logs/meshgate-check.log" 2>&1 \
  || die "meshgate check rejected $RUN_DIR/meshgate.toml: $(tail -n 5 "$RUN_DIR/logs/meshgate-check.log")"

start_bg meshgate "$PROXY_CPU" env MESHGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
  "$MESHGATE_BIN" --config "$RUN_DIR/meshgate.toml"
GW_PID=$LAST_PID
# /ready is 503 until the mesh identity (leaf and roots) and discovery have loaded
wait_http "http://127.0.0.1:$P_ADMIN/ready" 30 "$GW_PID" \
  || die "meshgate not ready within 30 s: $(curl -s --max-time 2 "http://127.0.0.1:$P_ADMIN/ready" || true) $(tail -n 5 "$RUN_DIR/logs/meshgate.log")"

# Each route answers the fixed body over the transport it should: TLS 1.3 to the sidecars, and
# never a resumed session on the fresh one (else mesh-fresh would not measure full handshakes).
check_route() { # PATH EXPECTED_TLS_HEADER_PATTERN
  local path="$1" want="$2" head body n
  for n in 1 2 3; do
    head="$(curl -s -D - -o "$RUN_DIR/check.body" --max-time 5 "http://127.0.0.1:$P_GW$path" || true)"
    body="$(cat "$RUN_DIR/check.body" 2>/dev/null || true)"
    [ "$body" = ok ] || die "GET $path through the gateway: body '$body', not 'ok'; head: $(echo "$head" | head -n 1); log: $(tail -n 3 "$RUN_DIR/logs/meshgate.log")"
    echo "$head" | tr -d '\r' | grep -qiE "^x-bench-tls: $want\$" \
      || die "GET $path: upstream transport '$(echo "$head" | tr -d '\r' | grep -i '^x-bench-tls' || true)', expected /$want/"
  done
}
check_route /plain 'none'
check_route /plain-fresh 'none'
check_route /mesh 'TLSv1\.[23] reused=\.'
check_route /mesh-fresh 'TLSv1\.[23] reused=\.'
MESH_STATUS="$(curl -s --max-time 5 "http://127.0.0.1:$P_ADMIN/status" \
  | python3 -c 'import json,sys; m=json.load(sys.stdin)["mesh"]; print(m["leaf"]["spiffe_id"], "loaded" if m["loaded"] else "NOT LOADED")' 2>/dev/null || true)"
log "gateway ready; mesh identity: ${MESH_STATUS:-unknown}; TLS to the sidecars: $(curl -s -D - -o /dev/null --max-time 5 "http://127.0.0.1:$P_GW/mesh" | tr -d '\r' | sed -n 's/^[Xx]-[Bb]ench-[Tt]ls: //p')"

# ---------------------------------------------------------------- measurement
TSV="$OUT/results.tsv"
printf 'scenario\tround\trps\trequests\tp50_ms\tp99_ms\tcpu_us_per_req\tupstream_cpu_us_per_req\terrors\tupstream_conns\tlg_busy\tproxy_busy\n' >"$TSV"

accepts() { curl -s --max-time 2 "http://127.0.0.1:$P_STATUS/" | awk 'NR == 3 { print $1 }'; }

run_load() { # SCENARIO SECS OUTFILE : one bounded wrk run on the load-generator core
  local cmd=(wrk -t1 -c"$CONNS" -d"${2}s" --timeout 10s -s "$CONF_DIR/wrk-report.lua" "http://127.0.0.1:$P_GW/$1")
  if [ "$PIN" = 1 ]; then cmd=(taskset -c "$LG_CPU" "${cmd[@]}"); fi
  ( exec timeout -k 5 $(($2 + 30)) "${cmd[@]}" ) >"$3" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || true
  LOAD_PID=""
}

measure() { # SCENARIO ROUND
  local s="$1" r="$2" f="$RAW/$1-r$2.txt" gw0 gw1 up0 up1 a0 a1 lg pr ups=()
  mapfile -t ups < <(descendants "$UP_PID")
  a0="$(accepts)"; gw0="$(cpu_ticks "$GW_PID")"; up0="$(cpu_ticks "${ups[@]}")"
  cpu_snapshot >"$RUN_DIR/stat.before"
  run_load "$s" "$DUR" "$f"
  cpu_snapshot >"$RUN_DIR/stat.after"
  gw1="$(cpu_ticks "$GW_PID")"; up1="$(cpu_ticks "${ups[@]}")"; a1="$(accepts)"
  lg="$(core_busy "$RUN_DIR/stat.before" "$RUN_DIR/stat.after" "$LG_CPU")"
  pr="$(core_busy "$RUN_DIR/stat.before" "$RUN_DIR/stat.after" "$PROXY_CPU")"
  local reqs secs p50 p99 errs
  read -r reqs secs p50 p99 errs < <(awk '/^MESHGATE_BENCH / {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "%d %.3f %.3f %.3f %d\n", v["requests"], v["duration_us"] / 1e6, v["p50_us"] / 1000,
        v["p99_us"] / 1000, v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"] }' "$f"; echo) || true
  if [ -z "${reqs:-}" ] || [ "$reqs" = 0 ]; then
    log "WARNING: no result for $s round $r (see $f)"
    printf '%s\t%s\t-\t0\t-\t-\t-\t-\t%s\t-\t%s\t%s\n' "$s" "$r" "${errs:-1}" "$lg" "$pr" >>"$TSV"
    return 0
  fi
  local rps cpu upcpu conns
  rps="$(awk -v n="$reqs" -v t="$secs" 'BEGIN { printf "%.0f", (t > 0) ? n / t : 0 }')"
  cpu="$(awk -v d=$((gw1 - gw0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz / n * 1e6 }')"
  upcpu="$(awk -v d=$((up1 - up0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d / hz / n * 1e6 }')"
  conns=$((a1 - a0 - 1))   # the first stub_status read is itself one accepted connection
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$rps" "$reqs" "$p50" "$p99" "$cpu" \
    "$upcpu" "$errs" "$conns" "$lg" "$pr" >>"$TSV"
  log "$(printf '%-11s r%-2s %7s req/s  p50 %6s  p99 %6s ms  gateway %6s µs/req  upstream %6s µs/req  err %s  upstream conns %s  cores %s/%s%%' \
    "$s" "$r" "$rps" "$p50" "$p99" "$cpu" "$upcpu" "$errs" "$conns" "$lg" "$pr")"
}

rotated() { # ROUND -> scenarios, rotated by ROUND-1 so none always runs first or last
  local r="$1" n="${#SCEN_LIST[@]}" i
  for ((i = 0; i < n; i++)); do echo "${SCEN_LIST[$(( (i + r - 1) % n ))]}"; done
}

n_s=${#SCEN_LIST[@]}
est=$((n_s * (WARMUP + PAUSE) + ROUNDS * n_s * (DUR + PAUSE + 1)))
place="unpinned"
[ "$PIN" = 1 ] && place="pinned: wrk core $LG_CPU, gateway core $PROXY_CPU, nginx and Consul stub core $BACKEND_CPU"
log "scenarios: ${SCEN_LIST[*]}; $ROUNDS round(s) x ${DUR}s at $CONNS connections; $place"
log "estimated time: ~$((est / 60)) min $((est % 60)) s; output: $OUT"

if [ "$WARMUP" -gt 0 ]; then
  for s in "${SCEN_LIST[@]}"; do run_load "$s" "$WARMUP" "$RAW/$s-warmup.txt"; sleep "$PAUSE"; done
fi
for r in $(seq 1 "$ROUNDS"); do
  for s in $(rotated "$r"); do
    measure "$s" "$r"
    sleep "$PAUSE"
  done
done
kill -0 "$GW_PID" 2>/dev/null || die "the gateway died during the run: $(tail -n 5 "$RUN_DIR/logs/meshgate.log")"

# ---------------------------------------------------------------- report
col() { # SCENARIO COLUMN -> numeric values
  awk -F'\t' -v s="$1" -v k="$2" 'NR > 1 && $1 == s && $k != "-" && $k != "" { print $k }' "$TSV"
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit }
  if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
sumv() { awk '{ s += $1; n++ } END { if (n) print s; else print "-" }'; }
fmt() { awk -v v="$1" -v d="$2" 'BEGIN { if (v == "-" || v == "") print "-"; else printf "%.*f\n", d, v }'; }
# paired A B COLUMN : median over rounds of A's value / B's value in the same round. Rounds are
# interleaved, so each pair ran minutes apart at most: this follows a shared machine's drift
# better than a ratio of the two medians.
paired() {
  awk -F'\t' -v a="$1" -v b="$2" -v k="$3" 'NR > 1 && $k != "-" && $k != "" {
      if ($1 == a) va[$2] = $k; else if ($1 == b) vb[$2] = $k }
    END { for (r in va) if ((r in vb) && vb[r] + 0 != 0) print va[r] / vb[r] }' "$TSV" \
    | median | awk '{ if ($1 == "-") print "-"; else printf "%.2f\n", $1 }'
}
minus() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%.1f\n", a - b }'; }

declare -A MED=()
for s in "${SCEN_LIST[@]}"; do
  MED[$s.rps]="$(col "$s" 3 | median)"
  MED[$s.reqs]="$(col "$s" 4 | median)"
  MED[$s.p50]="$(col "$s" 5 | median)"
  MED[$s.p99]="$(col "$s" 6 | median)"
  MED[$s.cpu]="$(col "$s" 7 | median)"
  MED[$s.upcpu]="$(col "$s" 8 | median)"
  MED[$s.err]="$(col "$s" 9 | sumv)"
  MED[$s.conns]="$(col "$s" 10 | median)"
  MED[$s.lg]="$(col "$s" 11 | median)"
  MED[$s.pr]="$(col "$s" 12 | median)"
done

table() {
  local s
  echo "| scenario | upstream transport | req/s | p50 ms | p99 ms | gateway CPU µs/req | nginx CPU µs/req | upstream conns opened /run | errors | wrk / gateway core busy % |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for s in "${SCEN_LIST[@]}"; do
    local what
    case "$s" in
      plain) what="HTTP/1.1, pooled" ;;
      mesh) what="mTLS (Connect), pooled" ;;
      mesh-fresh) what="mTLS, new connection + full handshake per request" ;;
      plain-fresh) what="HTTP/1.1, new connection per request" ;;
    esac
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s |\n' "$s" "$what" \
      "$(fmt "${MED[$s.rps]}" 0)" "$(fmt "${MED[$s.p50]}" 2)" "$(fmt "${MED[$s.p99]}" 2)" \
      "$(fmt "${MED[$s.cpu]}" 1)" "$(fmt "${MED[$s.upcpu]}" 1)" "$(fmt "${MED[$s.conns]}" 0)" \
      "${MED[$s.err]}" "$(fmt "${MED[$s.lg]}" 0)" "$(fmt "${MED[$s.pr]}" 0)"
  done
  local a b
  for pair in "mesh plain" "mesh-fresh plain-fresh"; do
    read -r a b <<<"$pair"
    if ! has_scen "$a" || ! has_scen "$b"; then continue; fi
    printf '| **%s/%s** | | %s | %s | %s | %s | %s | | | |\n' "$a" "$b" \
      "$(paired "$a" "$b" 3)" "$(paired "$a" "$b" 5)" "$(paired "$a" "$b" 6)" \
      "$(paired "$a" "$b" 7)" "$(paired "$a" "$b" 8)"
  done
}

SUMMARY="$OUT/summary.md"
{
  echo "## Mesh (issue #13) · $(date -u '+%Y-%m-%d %H:%M:%S UTC') · commit $(commit_line)"
  echo
  echo "- machine: $(machine_line)"
  echo "- versions: nginx $(nginx -v 2>&1 | sed 's#.*nginx/##'), $(openssl version | awk '{ print $1, $2 }'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }'), meshgate binary $MESHGATE_BIN"
  echo "- command: \`$CMDLINE\`"
  echo "- method: one gateway (one worker), four routes to the same fixed nginx answer; medians of $ROUNDS interleaved round(s) (ratios: medians of the per-round ratios) of ${DUR} s at $CONNS keep-alive wrk connections (wrk -t1), warm-up ${WARMUP} s per scenario; $place; CPU from /proc (utime + stime) over each run"
  [ -n "$NOTE" ] && echo "- note: $NOTE"
  echo
  table
  echo
  if has_scen mesh-fresh && has_scen plain-fresh; then
    cost="$(minus "${MED[mesh-fresh.cpu]}" "${MED[plain-fresh.cpu]}")"
    upcost="$(minus "${MED[mesh-fresh.upcpu]}" "${MED[plain-fresh.upcpu]}")"
    hs="$(awk -v c="${MED[mesh-fresh.conns]}" -v d="$DUR" 'BEGIN { if (c == "-") print "-"; else printf "%.0f", c / d }')"
    cap="$(awk -v c="${MED[mesh-fresh.cpu]}" 'BEGIN { if (c == "-" || c + 0 == 0) print "-"; else printf "%.0f", 1e6 / c }')"
    echo "Cost of a fresh mTLS connection (mesh-fresh minus plain-fresh, CPU per request): **$cost µs** of gateway CPU (the sidecar nginx: $upcost µs). Full handshakes achieved: $hs/s (upstream connections opened / run time); one gateway core would sustain about $cap requests/s with a full handshake each."
    echo
  fi
  busy=""
  for s in "${SCEN_LIST[@]}"; do
    if [ "${MED[$s.lg]}" != - ] && awk -v v="${MED[$s.lg]}" 'BEGIN { exit !(v >= 90) }'; then busy="$busy $s"; fi
  done
  [ -n "$busy" ] && echo "wrk's core (shared with nginx) ≥ 90 % busy in:$busy — req/s there is partly capped by the rig; compare CPU µs/req." && echo
} >"$SUMMARY"

echo
cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
  { echo; cat "$SUMMARY"; } >>"$BENCH_DIR/RESULTS.md"
  log "appended to bench/RESULTS.md"
else
  log "not recorded (--no-record)"
fi
