# shellcheck shell=bash
# bench/lib.sh: helpers shared by bench/run.sh and bench/chaos.sh (sourced, not run).
#
# Rules both scripts keep:
# - only 127.0.0.1 is ever listened on by what we configure, and only 127.0.0.1 is loaded;
# - every process we start is recorded by PID in STARTED and stopped by PID on exit,
#   Ctrl-C or SIGTERM (never by name);
# - every loop and every load run is bounded in time.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"
CONF_DIR="$BENCH_DIR/conf"

STARTED=()          # PIDs of every long-running process we started
LAST_PID=""
RUN_DIR=""          # scratch dir for configs, logs, pid files (set by the caller)
PIN=1               # 1 = use taskset

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: %s\n' "${SCRIPT_NAME:-bench}" "$*" >&2; exit 1; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------- tools

# need_tools CMD... : install the Debian packages that provide missing commands (as root,
# or through sudo), else fail with the command to run. apt-get update runs at most once.
APT_UPDATED=0
need_tools() {
  local missing=() pkgs=() c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 && continue
    missing+=("$c")
    case "$c" in
      nginx) pkgs+=(nginx-light) ;;
      taskset) pkgs+=(util-linux) ;;
      ps) pkgs+=(procps) ;;
      python3) pkgs+=(python3) ;;
      oha) die "oha is not a Debian package: cargo install oha --locked (or use --tool wrk)" ;;
      *) pkgs+=("$c") ;;   # wrk, haproxy, curl
    esac
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}; install with: apt-get install -y ${pkgs[*]}"
    sudo="sudo"
  fi
  [ "${NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]}; install with: apt-get install -y ${pkgs[*]}"
  log "installing ${pkgs[*]} (missing: ${missing[*]})"
  if [ "$APT_UPDATED" = 0 ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
  # Debian's nginx/haproxy packages may start a system service of their own; we never use it
  # (our processes run from our own configs under RUN_DIR on ports chosen here).
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2 \
    || die "apt-get install ${pkgs[*]} failed"
  for c in "${missing[@]}"; do command -v "$c" >/dev/null 2>&1 || die "$c still missing after install"; done
}

# raise_nofile N : raise this shell's open-files limit (inherited by everything we start) to at
# least N where possible: the hard limit only goes up (root can), the soft one up to the hard.
# Call it directly (not in $(...)), then read `ulimit -n`.
raise_nofile() {
  local want="$1" hard
  hard="$(ulimit -Hn)"
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
    ulimit -Hn "$want" 2>/dev/null || true
    hard="$(ulimit -Hn)"
  fi
  local soft; soft="$(ulimit -n)"
  if [ "$soft" = unlimited ] || [ "$soft" -ge "$want" ]; then return 0; fi
  if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then ulimit -n "$want" 2>/dev/null || true
  else ulimit -n "$hard" 2>/dev/null || true
  fi
}

# ---------------------------------------------------------------- ports (127.0.0.1 only)

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_ports N [BASE] : N distinct TCP ports on 127.0.0.1. With BASE: BASE..BASE+N-1, each
# checked free (nothing listening, and bindable). Without: chosen by the kernel (bind to :0).
free_ports() {
  local n="$1" base="${2:-}"
  python3 - "$n" "$base" <<'EOF'
import socket, sys
n = int(sys.argv[1]); base = sys.argv[2]
socks, ports = [], []
try:
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", int(base) + i if base else 0))
        except OSError as e:
            sys.exit(f"port {int(base) + i if base else 0} on 127.0.0.1 is not free: {e}")
        socks.append(s); ports.append(s.getsockname()[1])
finally:
    for s in socks:
        s.close()
print(" ".join(map(str, ports)))
EOF
}

need_port_free() { ! port_busy "$1" || die "port 127.0.0.1:$1 is in use (not by this script); pick another --port-base"; }

# ---------------------------------------------------------------- processes

# start_bg NAME CORE CMD... : start CMD in the background, pinned to CORE (unless PIN=0 or
# CORE is empty), stdout+stderr to RUN_DIR/logs/NAME.log. Sets LAST_PID to the process's own
# PID (the subshell execs taskset, which execs CMD) and records it in STARTED.
start_bg() {
  local name="$1" core="$2"; shift 2
  if [ "$PIN" = 1 ] && [ -n "$core" ]; then
    ( exec taskset -c "$core" "$@" ) >"$RUN_DIR/logs/$name.log" 2>&1 </dev/null &
  else
    ( exec "$@" ) >"$RUN_DIR/logs/$name.log" 2>&1 </dev/null &
  fi
  LAST_PID=$!
  STARTED+=("$LAST_PID")
}

# descendants PID : PID and all its descendants (by parent PID, from ps), one per line
descendants() {
  local p="$1" c
  kill -0 "$p" 2>/dev/null || return 0
  echo "$p"
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do descendants "$c"; done
}

# stop_pid PID [GRACE_SECS] : SIGTERM to PID and its descendants, SIGKILL to whatever is left
# after GRACE_SECS (default 3). Only PIDs we started (and their children) are ever passed here.
stop_pid() {
  local pid="$1" grace="${2:-3}" all=() p i alive
  [ -n "$pid" ] || return 0
  mapfile -t all < <(descendants "$pid")
  [ "${#all[@]}" -gt 0 ] || { wait "$pid" 2>/dev/null || true; return 0; }
  for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((i = 0; i < grace * 10; i++)); do
    alive=0
    for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && { alive=1; break; }; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}

# forget_pid PID : drop PID from STARTED (after stop_pid)
forget_pid() {
  local keep=() p
  for p in "${STARTED[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
}

stop_all() {
  local p
  for p in "${STARTED[@]}"; do stop_pid "$p" 3; done
  STARTED=()
}

# wait_http URL [SECS] [PID] : 0 once GET URL answers 200 (bounded: SECS, default 30);
# 1 at once if PID (the server) has exited.
wait_http() {
  local url="$1" secs="${2:-30}" pid="${3:-}" i
  for ((i = 0; i < secs * 10; i++)); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)" = 200 ] && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- /proc sampling

CLK_TCK="$(getconf CLK_TCK)"

# cpu_ticks PID... : utime+stime (clock ticks) summed over the given processes
cpu_ticks() {
  local p v sum=0
  for p in "$@"; do
    v="$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null)" || v=0
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

# status_kb FIELD PID... : a /proc/PID/status field (VmRSS, VmHWM) in KiB, summed
status_kb() {
  local field="$1" p v sum=0; shift
  for p in "$@"; do
    v="$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/status" 2>/dev/null)" || v=0
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

cpu_snapshot() { grep -E '^cpu[0-9]+ ' /proc/stat; }

# core_busy BEFORE_FILE AFTER_FILE CORES : busy % of those cores (one, or a comma-separated
# list taken together) between the two snapshots
core_busy() {
  awk -v list="$3" '
    BEGIN { n = split(list, cs, ","); for (i = 1; i <= n; i++) want["cpu" cs[i]] = 1 }
    FNR == NR && ($1 in want) { for (i = 2; i <= NF; i++) a[$1, i] = $i; next }
    ($1 in want) { for (i = 2; i <= NF; i++) { d = $i - a[$1, i]; tot += d; if (i == 5 || i == 6) idle += d } }
    END { if (tot <= 0) { print "-"; exit }
          printf "%.0f\n", 100 * (tot - idle) / tot }' "$1" "$2"
}

# render TEMPLATE OUTPUT VAR=VALUE... : copy TEMPLATE replacing every @VAR@ with VALUE;
# fails if an @UPPERCASE@ placeholder is left over.
render() {
  local in="$1" out="$2" kv k v; shift 2
  cp "$in" "$out"
  for kv in "$@"; do
    k="${kv%%=*}"; v="${kv#*=}"
    v="${v//\\/\\\\}"; v="${v//&/\\&}"; v="${v//|/\\|}"
    sed -i "s|@${k}@|${v}|g" "$out"
  done
  if grep -qE '@[A-Z_]+@' "$out"; then
    die "unfilled placeholder in $out: $(grep -oE '@[A-Z_]+@' "$out" | sort -u | tr '\n' ' ')"
  fi
}

# ---------------------------------------------------------------- machine / repo facts

machine_line() {
  local model mem
  model="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null)"
  [ -n "$model" ] || model="$(uname -m)"
  mem="$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  printf '%s cores (nproc), %s, %s RAM, Linux %s' "$(nproc)" "$model" "$mem" "$(uname -r)"
}

# quote_args ARG... : the arguments as one shell-readable string (for the recorded command line):
# plain words as they are, anything else in single quotes
quote_args() {
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./,:=@%+-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "$out"
}

# load_line : the 1/5/15-minute load averages, as uptime prints them
load_line() { awk '{ printf "load average %s, %s, %s", $1, $2, $3 }' /proc/loadavg; }

# commit_line : short commit + "-dirty" when tracked files differ (bench/RESULTS.md ignored)
commit_line() {
  local c
  c="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null)" || { echo "no-commit"; return; }
  if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no -- . ':(exclude)bench/RESULTS.md' 2>/dev/null)" ]; then
    c="$c-dirty"
  fi
  echo "$c"
}
