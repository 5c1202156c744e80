#!/usr/bin/env bash
# bench/policies.sh: what each edge policy (issue #14) costs on the admitted path. Same rig as
# bench/overhead.sh (one fast nginx upstream, meshgate with one worker pinned to the proxy core,
# wrk pinned to the load-generator core, interleaved rounds, CPU per request from /proc), and
# these variants of one route (conf/policies-meshgate.toml.in plus the lines below):
#
#   bare                no policy (the baseline)
#   rl-local            rate_limit = { rate = "1000000/s", burst = 1000000, key = "client_ip" }
#   rl-local-noheaders  the same with headers = false
#   rl-global           the same with scope = "global", [redis] on a redis-server started here
#   auth-key            auth = { api_keys = { keys_env = "KEYS" } }, wrk sends X-Api-Key
#   auth-jwt            auth = { jwt = { hs256_secret_env = "SECRET", ... } }, wrk sends a
#                       valid HS256 bearer token (made here with the python3 standard library)
#
# The limits never refuse (the run counts 4xx/5xx answers and says so). Ratios against bare are paired:
# the median over rounds of the two variants' ratio in the same round. A latency pass at one
# connection compares bare and rl-global, where no queueing hides the Redis round trip.
# Then each variant runs once under callgrind (like bench/instructions.sh): user-space
# instructions per request, the deterministic figure on a noisy machine.
# Only 127.0.0.1 is listened on and loaded; everything started here is stopped by PID on exit.
set -euo pipefail

SCRIPT_NAME="bench/policies.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

ROUNDS=3
DUR=8
WARMUP=2
CONNS=50
VARIANTS="bare,rl-local,rl-local-noheaders,rl-global,auth-key,auth-jwt"
LATENCY=1
CG_N=20000          # requests counted under callgrind per variant (0 = no callgrind pass)
CG_WARM=1000
CG_CONNS=10
BUILD=1
RECORD=1
NOTE=""
OUT=""
LG_CPU=0
PROXY_CPU=""
MESHGATE_BIN="${MESHGATE_BIN:-}"
# Not passed on: meshgate reads MESHGATE_* variables as configuration ("bin: unknown key").
export -n MESHGATE_BIN
CMDLINE="bench/policies.sh$(quote_args "$@")"

usage() {
  cat <<EOF
Usage: bench/policies.sh [options]

CPU per request, req/s and latency of one route with each edge policy on (local and global
rate limit, API key, JWT) against the same route without it. Prints a markdown table of
medians over interleaved rounds and appends it to bench/RESULTS.md. A default run takes about
5 minutes after the release build.

  -r N          interleaved rounds (default $ROUNDS)
  -d SECS       seconds per measured run (default $DUR)
  -w SECS       warm-up per run, not recorded (default $WARMUP)
  -c N          keep-alive connections (default $CONNS)
  -v LIST       variants, comma separated (default $VARIANTS)
  --no-latency  skip the one-connection latency pass (bare and rl-global)
  --callgrind N requests counted per variant under callgrind (default $CG_N; 0 = skip;
                needs valgrind)
  --quick       smoke run: -r 1 -d 2 -w 1
  --no-build    do not run cargo; use \$MESHGATE_BIN or target/release/meshgate
  --no-record   print the table but do not append it to bench/RESULTS.md
  --note TEXT   a note recorded with the results
  --no-pin      do not pin with taskset
  -o DIR        keep configs, logs and raw output in DIR (default: a new /tmp dir)
  -h, --help    this help

Needs wrk, nginx, curl, python3, taskset and (for rl-global) redis-server and redis-cli;
missing Debian packages are installed with apt-get.
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="${2:?}"; shift 2 ;;
    -d) DUR="${2:?}"; shift 2 ;;
    -w) WARMUP="${2:?}"; shift 2 ;;
    -c) CONNS="${2:?}"; shift 2 ;;
    -v) VARIANTS="${2:?}"; shift 2 ;;
    --no-latency) LATENCY=0; shift ;;
    --callgrind) CG_N="${2:?}"; shift 2 ;;
    --quick) ROUNDS=1; DUR=2; WARMUP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-record) RECORD=0; shift ;;
    --note) NOTE="${2:?}"; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    -o) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
in_range() { is_uint "$1" && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$ROUNDS" 1 50 || die "-r must be 1..50"
in_range "$DUR" 1 600 || die "-d must be 1..600"
in_range "$WARMUP" 0 600 || die "-w must be 0..600"
in_range "$CONNS" 1 10000 || die "-c must be 1..10000"
[ "$CG_N" = 0 ] || in_range "$CG_N" 100 10000000 || die "--callgrind must be 0 or 100..10000000"
IFS=, read -r -a VARS <<<"$VARIANTS"
declare -A SEEN=()
for v in "${VARS[@]}"; do
  case "$v" in bare|rl-local|rl-local-noheaders|rl-global|auth-key|auth-jwt) ;;
    *) die "unknown variant '$v' (bare, rl-local, rl-local-noheaders, rl-global, auth-key, auth-jwt)" ;; esac
  [ -z "${SEEN[$v]:-}" ] || die "variant $v given twice"
  SEEN[$v]=1
done
[ -n "${SEEN[bare]:-}" ] || die "the variants must include bare (the baseline)"
has_var() { [ -n "${SEEN[$1]:-}" ]; }
[ "$LATENCY" = 1 ] && ! has_var rl-global && LATENCY=0

tools=(wrk nginx curl python3 taskset)
has_var rl-global && tools+=(redis-server redis-cli)
[ "$CG_N" = 0 ] || tools+=(valgrind callgrind_control)
need_tools "${tools[@]}"
[ "$(nproc)" -ge 2 ] || PIN=0
PROXY_CPU="$(( $(nproc) > 1 ? 1 : 0 ))"

if [ -z "$MESHGATE_BIN" ]; then
  MESHGATE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/meshgate"
  if [ "$BUILD" = 1 ]; then
    log "building meshgate (cargo build --release --bin meshgate) before any measurement"
    (cd "$REPO_ROOT" && cargo build --release --bin meshgate) || die "cargo build failed"
  fi
fi
[ -x "$MESHGATE_BIN" ] || die "no meshgate binary at $MESHGATE_BIN"
while read -r v; do
  case "$v" in MESHGATE_*) unset "$v" ;; esac
done < <(compgen -e)

[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-policies.XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www" "$RAW"
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
: >"$RUN_DIR/www/1m.bin"
raise_nofile 4096

ports="$(free_ports 5)" || die "could not reserve free ports on 127.0.0.1"
read -r P_BA P_SA P_MESHGATE P_ADMIN P_REDIS <<<"$ports"
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE=4096 RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"

# ---------------------------------------------------------------- credentials
# A random API key and HS256 secret per run; the gateway gets the key's hash (KEYS) and the
# secret (SECRET) through its environment, wrk the key and a token valid for ten years.
API_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
KEYS_LINE="bench $(printf %s "$API_KEY" | sha256sum | awk '{ print $1 }')"
JWT_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
JWT_ISS="https://bench.meshgate.test/"
JWT_AUD="bench"
TOKEN="$(python3 - "$JWT_SECRET" "$JWT_ISS" "$JWT_AUD" <<'EOF'
import base64, hashlib, hmac, json, sys, time
secret, iss, aud = sys.argv[1:4]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
now = int(time.time())
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
body = b64(json.dumps({"iss": iss, "aud": aud, "sub": "bench", "iat": now,
                       "exp": now + 10 * 365 * 86400}, separators=(",", ":")).encode())
sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
EOF
)"

# ---------------------------------------------------------------- one config per variant
policy_lines() { # VARIANT -> lines appended to the route (and [redis] after it)
  local rl='rate = "1000000/s", burst = 1000000, key = "client_ip"'
  case "$1" in
    bare) ;;
    rl-local) echo "rate_limit = { $rl }" ;;
    rl-local-noheaders) echo "rate_limit = { $rl, headers = false }" ;;
    rl-global) printf 'rate_limit = { %s, scope = "global" }\n\n[redis]\nurl = "redis://127.0.0.1:%s"\n' "$rl" "$P_REDIS" ;;
    auth-key) echo 'auth = { api_keys = { keys_env = "KEYS" } }' ;;
    auth-jwt) printf 'auth = { jwt = { hs256_secret_env = "SECRET", issuer = "%s", audiences = ["%s"] } }\n' "$JWT_ISS" "$JWT_AUD" ;;
  esac
}
client_header() { # VARIANT -> the one header the client sends (empty: none)
  case "$1" in
    auth-key) echo "X-Api-Key: $API_KEY" ;;
    auth-jwt) echo "Authorization: Bearer $TOKEN" ;;
  esac
}
gw_env=(MESHGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 RUST_LOG=warn MESHGATE_SERVER__DRAIN_DELAY=0s
  "KEYS=$KEYS_LINE" "SECRET=$JWT_SECRET")

for v in "${VARS[@]}"; do
  render "$CONF_DIR/policies-meshgate.toml.in" "$RUN_DIR/meshgate-$v.toml" PORT="$P_MESHGATE" ADMIN_PORT="$P_ADMIN" BA="$P_BA"
  policy_lines "$v" >>"$RUN_DIR/meshgate-$v.toml"
  env "${gw_env[@]}" "$MESHGATE_BIN" check --config "$RUN_DIR/meshgate-$v.toml" >"$RUN_DIR/logs/check-$v.log" 2>&1 \
    || die "meshgate check rejected the $v config: $(tail -n 5 "$RUN_DIR/logs/check-$v.log")"
done

LOAD_PID=""
REDIS_PID=""
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

# ---------------------------------------------------------------- upstream and Redis
start_bg backend-a "$LG_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-a.err" -c "$RUN_DIR/backend-a.conf"
wait_http "http://127.0.0.1:$P_BA/" 30 "$LAST_PID" || die "upstream did not start (see $RUN_DIR/logs)"

rcli() { timeout 5 redis-cli -h 127.0.0.1 -p "$P_REDIS" "$@" </dev/null; }
# evalsha_calls : EVALSHA + EVAL calls Redis has run so far (INFO commandstats)
evalsha_calls() {
  rcli info commandstats | tr -d '\r' \
    | awk -F'[:,=]' '$1 == "cmdstat_evalsha" || $1 == "cmdstat_eval" { n += $3 } END { print n + 0 }'
}
if has_var rl-global; then
  # On the load-generator core, like the upstream: its CPU is not the gateway's.
  start_bg redis "$LG_CPU" redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no
  REDIS_PID="$LAST_PID"
  for ((i = 0; i < 100; i++)); do
    [ "$(rcli ping 2>/dev/null)" = PONG ] && break
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited: $(tail -n 5 "$RUN_DIR/logs/redis.log")"
    sleep 0.1
  done
  [ "$(rcli ping 2>/dev/null)" = PONG ] || die "redis-server did not answer PING within 10 s"
fi

# ---------------------------------------------------------------- one measured run
TSV="$OUT/results.tsv"
printf 'variant\tround\tconns\treq_s\tp50_ms\tp99_ms\tcpu_us_per_req\tstatus_4xx_5xx\terrors\tredis_calls_per_req\tredis_cpu_us_per_req\n' >"$TSV"

# check_variant VARIANT : the route answers 200 with the client's credentials, and the policy is
# really on (a limit's RateLimit header, or its absence with headers = false; 401 without the
# credential; for rl-global, Redis ran the script).
check_variant() {
  local v="$1" url="http://127.0.0.1:$P_MESHGATE/" hdr code heads calls0
  hdr="$(client_header "$v")"
  local args=(-s --max-time 5 -o /dev/null -D -)
  [ -n "$hdr" ] && args+=(-H "$hdr")
  [ "$v" = rl-global ] && calls0="$(evalsha_calls)"
  heads="$(curl "${args[@]}" "$url" | tr -d '\r')" || die "$v: no answer from the gateway"
  code="$(awk 'NR == 1 { print $2 }' <<<"$heads")"
  [ "$code" = 200 ] || die "$v: GET / answered $code, not 200"
  case "$v" in
    rl-local|rl-global) grep -qi '^ratelimit:' <<<"$heads" || die "$v: no RateLimit header: the limit is not on" ;;
    rl-local-noheaders|bare|auth-*) ! grep -qi '^ratelimit:' <<<"$heads" || die "$v: unexpected RateLimit header" ;;
  esac
  case "$v" in
    auth-*)
      code="$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "$url")"
      [ "$code" = 401 ] || die "$v: GET / without credentials answered $code, not 401"
      ;;
    rl-global)
      [ "$(evalsha_calls)" -gt "$calls0" ] || die "rl-global: Redis ran no script for the request"
      ;;
  esac
}

measure() { # VARIANT ROUND CONNS
  local v="$1" r="$2" c="$3" tag f pid cpu0 cpu1 rcpu0=0 rcpu1=0 calls0=0 calls1=0 hdr
  tag="$v"; [ "$c" != "$CONNS" ] && tag="$v@c$c"
  f="$RAW/$tag-r$r.txt"
  start_bg "meshgate-$tag-r$r" "$PROXY_CPU" env "${gw_env[@]}" "$MESHGATE_BIN" --config "$RUN_DIR/meshgate-$v.toml"
  pid="$LAST_PID"
  # The admin /ready, then the proxy port: "/" itself may rightly answer 401 (auth variants).
  wait_http "http://127.0.0.1:$P_ADMIN/ready" 30 "$pid" \
    || die "meshgate ($v) did not start (see $RUN_DIR/logs/meshgate-$tag-r$r.log)"
  local i
  for ((i = 0; i < 100; i++)); do port_busy "$P_MESHGATE" && break; sleep 0.1; done
  port_busy "$P_MESHGATE" || die "meshgate ($v) does not listen on $P_MESHGATE"
  check_variant "$v"
  local url="http://127.0.0.1:$P_MESHGATE/"
  local wrk=(wrk -t1 -c"$c" --timeout 10s -s "$CONF_DIR/wrk-report.lua")
  hdr="$(client_header "$v")"
  [ -n "$hdr" ] && wrk+=(-H "$hdr")
  [ "$PIN" = 1 ] && wrk=(taskset -c "$LG_CPU" "${wrk[@]}")
  if [ "$WARMUP" -gt 0 ]; then
    timeout -k 5 $((WARMUP + 30)) "${wrk[@]}" -d"${WARMUP}s" "$url" >/dev/null 2>&1 </dev/null || true
  fi
  if [ "$v" = rl-global ]; then calls0="$(evalsha_calls)"; rcpu0="$(cpu_ticks "$REDIS_PID")"; fi
  cpu0="$(cpu_ticks "$pid")"
  ( exec timeout -k 5 $((DUR + 30)) "${wrk[@]}" -d"${DUR}s" "$url" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || true
  LOAD_PID=""
  cpu1="$(cpu_ticks "$pid")"
  if [ "$v" = rl-global ]; then calls1="$(evalsha_calls)"; rcpu1="$(cpu_ticks "$REDIS_PID")"; fi
  kill -0 "$pid" 2>/dev/null || die "meshgate ($v) died during the run (see $RUN_DIR/logs/meshgate-$tag-r$r.log)"
  stop_pid "$pid" 5
  forget_pid "$pid"
  grep -q '^MESHGATE_BENCH ' "$f" || die "$tag: wrk printed no result: $(tail -n 3 "$f")"
  awk -v v="$tag" -v r="$r" -v c="$c" -v d=$((cpu1 - cpu0)) -v rd=$((rcpu1 - rcpu0)) -v hz="$CLK_TCK" \
    -v calls=$((calls1 - calls0)) -v glob="$([ "$v" = rl-global ] && echo 1 || echo 0)" '
    /^MESHGATE_BENCH / {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); x[kv[1]] = kv[2] }
      n = x["requests"]; s = x["duration_us"] / 1e6
      # wrk counts requests still in flight when it stops; the Redis count is exact, so
      # calls per request is very slightly below 1 when every request makes one call.
      printf "%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%.2f\t%d\t%d\t%s\t%s\n", v, r, c, (s > 0) ? n / s : 0,
        x["p50_us"] / 1000, x["p99_us"] / 1000, (n > 0) ? d / hz / n * 1e6 : 0, x["status"],
        x["connect"] + x["read"] + x["write"] + x["timeout"],
        (glob && n > 0) ? sprintf("%.3f", calls / n) : "-", (glob && n > 0) ? sprintf("%.2f", rd / hz / n * 1e6) : "-"
    }' "$f" | tee -a "$TSV" | awk -F'\t' '{ printf "[run] %-22s r%s %8s req/s  p50 %s  p99 %s ms  cpu %s us/req  4xx/5xx %s  errors %s  redis calls/req %s\n", $1, $2, $4, $5, $6, $7, $8, $9, $10 }' >&2
}

LOAD_START="$(load_line)"
log "variants: ${VARS[*]}; $ROUNDS round(s) of ${DUR}s at $CONNS connections; output in $OUT"
for ((r = 1; r <= ROUNDS; r++)); do
  # Rotate the order each round so slow phases of the machine hit every variant alike.
  n="${#VARS[@]}"
  for ((i = 0; i < n; i++)); do
    measure "${VARS[$(( (i + r - 1) % n ))]}" "$r" "$CONNS"
    sleep 1
  done
  if [ "$LATENCY" = 1 ]; then
    if [ $((r % 2)) = 1 ]; then lat=(bare rl-global); else lat=(rl-global bare); fi
    for v in "${lat[@]}"; do measure "$v" "$r" 1; sleep 1; done
  fi
done

# Redis round trip with nothing else running: PING from redis-cli for 3 s, plus the script's own run time inside Redis (INFO commandstats usec_per_call).
REDIS_RTT="-"; REDIS_SCRIPT_US="-"
if has_var rl-global; then
  # --raw prints "min max avg count" (milliseconds) when stopped; one PING every 10 ms.
  lat_out="$(timeout -s INT -k 2 3 redis-cli -h 127.0.0.1 -p "$P_REDIS" --latency --raw </dev/null 2>&1 | tail -n 1 || true)"
  REDIS_RTT="$(awk 'NF == 4 && $3 ~ /^[0-9.]+$/ { print $3 * 1000 }' <<<"$lat_out")"
  [ -n "$REDIS_RTT" ] || REDIS_RTT="-"
  REDIS_SCRIPT_US="$(rcli info commandstats | tr -d '\r' \
    | awk -F'[:,=]' '$1 == "cmdstat_evalsha" { for (i = 2; i < NF; i += 2) if ($i == "usec_per_call") print $(i + 1) }')"
  [ -n "$REDIS_SCRIPT_US" ] || REDIS_SCRIPT_US="-"
  echo "$lat_out" >"$RAW/redis-latency.txt"
fi

# ---------------------------------------------------------------- callgrind pass
CG_TSV="$OUT/callgrind.tsv"
printf 'variant\trequests\tir_total\tir_per_request\n' >"$CG_TSV"
if [ "$CG_N" != 0 ]; then
  cat >"$RUN_DIR/count-load.py" <<'EOF'
# count-load.py PORT TOTAL CONNS DEADLINE_SECS [HEADER]: exactly TOTAL keep-alive GET / spread
# over CONNS threads (one request in flight each), every answer read whole; exits 1 unless
# all were 200. The gateway under callgrind is the bottleneck, so the GIL does not matter.
import http.client, sys, threading, time
port, total, conns, deadline = (int(a) for a in sys.argv[1:5])
headers = {}
if len(sys.argv) > 5 and sys.argv[5]:
    k, _, v = sys.argv[5].partition(":")
    headers[k.strip()] = v.strip()
end = time.monotonic() + deadline
lock = threading.Lock()
left, bad = [total], [0]
def worker():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < end:
        with lock:
            if left[0] == 0:
                return
            left[0] -= 1
        c.request("GET", "/", headers=headers)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            with lock:
                bad[0] += 1
threads = [threading.Thread(target=worker) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
print(f"DONE sent={total - left[0]} bad={bad[0]}")
sys.exit(0 if left[0] == 0 and bad[0] == 0 else 1)
EOF
  cg_measure() { # VARIANT
    local v="$1" cg="$RAW/callgrind.$1" pid ir hdr
    hdr="$(client_header "$v")"
    # env execs valgrind, taskset execs env: the PID started is valgrind's (the gateway's)
    start_bg "callgrind-$v" "$PROXY_CPU" env "${gw_env[@]}" valgrind --tool=callgrind \
      --callgrind-out-file="$cg" --dump-instr=no --compress-strings=no "$MESHGATE_BIN" --config "$RUN_DIR/meshgate-$v.toml"
    pid="$LAST_PID"
    wait_http "http://127.0.0.1:$P_ADMIN/ready" 120 "$pid" \
      || die "$v under callgrind did not start: $(tail -n 5 "$RUN_DIR/logs/callgrind-$v.log")"
    python3 "$RUN_DIR/count-load.py" "$P_MESHGATE" "$CG_WARM" "$CG_CONNS" 120 "$hdr" >"$RAW/cg-warm-$v.txt" 2>&1 \
      || die "$v under callgrind: warm-up failed: $(tail -n 3 "$RAW/cg-warm-$v.txt")"
    callgrind_control -z "$pid" >"$RAW/cg-control-$v.txt" 2>&1 || die "callgrind_control -z $pid failed"
    python3 "$RUN_DIR/count-load.py" "$P_MESHGATE" "$CG_N" "$CG_CONNS" 600 "$hdr" >"$RAW/cg-load-$v.txt" 2>&1 \
      || die "$v under callgrind: load failed: $(tail -n 3 "$RAW/cg-load-$v.txt")"
    callgrind_control -d "$pid" >>"$RAW/cg-control-$v.txt" 2>&1 || die "callgrind_control -d $pid failed"
    stop_pid "$pid" 10
    forget_pid "$pid"
    # the dump requested after the counted requests is the file with the suffix .1
    [ -f "$cg.1" ] || die "no callgrind dump $cg.1 (see $RAW/cg-control-$v.txt)"
    ir="$(awk '$1 == "summary:" { print $2; exit }' "$cg.1")"
    is_uint "$ir" || die "no summary line in $cg.1"
    printf '%s\t%s\t%s\t%s\n' "$v" "$CG_N" "$ir" "$((ir / CG_N))" >>"$CG_TSV"
    log "$(printf 'callgrind %-20s %s instructions for %s requests = %s per request' "$v" "$ir" "$CG_N" "$((ir / CG_N))")"
  }
  log "callgrind pass: $CG_WARM warm-up + $CG_N counted requests over $CG_CONNS connections per variant"
  for v in "${VARS[@]}"; do cg_measure "$v"; done
fi

# ---------------------------------------------------------------- summary
SUMMARY="$OUT/summary.md"
{
  echo "## Edge policies (issue #14) · $(date -u '+%Y-%m-%d %H:%M:%S UTC') · commit $(commit_line)"
  echo
  echo "- machine: $(machine_line); $LOAD_START at the start of the measurements, $(load_line) at the end"
  echo "- versions: nginx $(nginx -v 2>&1 | sed 's#.*nginx/##'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')$(has_var rl-global && printf ', redis-server %s' "$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"), meshgate binary $MESHGATE_BIN"
  echo "- command: \`$CMDLINE\`"
  echo "- method: one route to one nginx (fixed 200 answer), a fresh gateway process (one worker, pinned to core $PROXY_CPU) per run, wrk -t1 (and nginx, Redis) on core $LG_CPU; medians of $ROUNDS interleaved round(s) of ${DUR} s at $CONNS keep-alive connections, warm-up ${WARMUP} s; CPU = gateway utime + stime from /proc over the run / requests; ratios = median of the per-round ratios to bare (paired)"
  [ -n "$NOTE" ] && echo "- note: $NOTE"
  echo
  python3 - "$TSV" "$CONNS" "$REDIS_RTT" "$REDIS_SCRIPT_US" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
conns, rtt, script_us = sys.argv[2], sys.argv[3], sys.argv[4]
order = []
for r in rows:
    if r["variant"] not in order:
        order.append(r["variant"])
def vals(v, k):
    return [float(r[k]) for r in rows if r["variant"] == v and r[k] not in ("-", "")]
def med(v, k):
    x = vals(v, k)
    return statistics.median(x) if x else None
def paired(a, b, k):
    va = {r["round"]: float(r[k]) for r in rows if r["variant"] == a}
    vb = {r["round"]: float(r[k]) for r in rows if r["variant"] == b}
    q = [va[x] / vb[x] for x in va if x in vb and vb[x] != 0]
    return statistics.median(q) if q else None
pct = lambda q: "-" if q is None else f"{(q - 1) * 100:+.1f} %"
f = lambda x, d: "-" if x is None else f"{x:.{d}f}"
print(f"| variant | req/s | p50 ms | p99 ms | gateway CPU µs/req | CPU vs bare (paired) | req/s vs bare | 4xx/5xx | socket errors | Redis calls/req | Redis CPU µs/req |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for v in order:
    base = "bare@c1" if v.endswith("@c1") else "bare"
    name = v.replace("@c1", " (1 conn)")
    sel = [r for r in rows if r["variant"] == v]
    print(f"| {name} | {f(med(v, 'req_s'), 0)} | {f(med(v, 'p50_ms'), 3)} | {f(med(v, 'p99_ms'), 3)} "
          f"| {f(med(v, 'cpu_us_per_req'), 2)} | {'' if v == base else pct(paired(v, base, 'cpu_us_per_req'))} "
          f"| {'' if v == base else pct(paired(v, base, 'req_s'))} | {sum(int(r['status_4xx_5xx']) for r in sel)} "
          f"| {sum(int(r['errors']) for r in sel)} | {f(med(v, 'redis_calls_per_req'), 3)} "
          f"| {f(med(v, 'redis_cpu_us_per_req'), 2)} |")
print()
for suffix, label in (("", f"{conns} connections"), ("@c1", "1 connection")):
    g, b = "rl-global" + suffix, "bare" + suffix
    if g not in order or b not in order:
        continue
    d50 = [float(x["p50_ms"]) - float(y["p50_ms"]) for x in rows for y in rows
           if x["variant"] == g and y["variant"] == b and x["round"] == y["round"]]
    d99 = [float(x["p99_ms"]) - float(y["p99_ms"]) for x in rows for y in rows
           if x["variant"] == g and y["variant"] == b and x["round"] == y["round"]]
    p50g = med(g, "p50_ms")
    share = statistics.median(d50) / p50g * 100 if d50 and p50g else None
    print(f"- rl-global − bare at {label} (paired medians): p50 {statistics.median(d50) * 1000:+.0f} µs, "
          f"p99 {statistics.median(d99) * 1000:+.0f} µs; the Redis step is {f(share, 1)} % of rl-global's p50 "
          f"({p50g * 1000:.0f} µs)")
if rtt != "-":
    line = f"- Redis round trip alone (redis-cli --latency, PING, idle machine after the run): {float(rtt):.0f} µs average"
    if script_us != "-":
        line += f"; the GCRA script's own run time inside Redis (EVALSHA usec_per_call): {float(script_us):.2f} µs"
    c1 = med("rl-global@c1", "p50_ms")
    if c1:
        line += f"; PING + script = {(float(rtt) + float(script_us if script_us != '-' else 0)) / (c1 * 1000) * 100:.0f} % of rl-global's p50 at 1 connection"
    print(line)
EOF
  echo
  if [ "$CG_N" != 0 ]; then
    echo "Instructions per request under callgrind (user space, the whole gateway process; $CG_WARM warm-up requests, counters zeroed, then $CG_N keep-alive GET / over $CG_CONNS connections; one run per variant):"
    echo
    echo "| variant | instructions/req | vs bare |"
    echo "|---|---:|---:|"
    awk -F'\t' 'NR > 1 { v[NR] = $1; ir[NR] = $4; if ($1 == "bare") b = $4 }
      END { for (i = 2; i <= NR; i++) printf "| %s | %d | %s |\n", v[i], ir[i],
              (v[i] == "bare" || !b) ? "" : sprintf("%+.1f %%", (ir[i] / b - 1) * 100) }' "$CG_TSV"
    echo
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
