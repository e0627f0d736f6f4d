#!/usr/bin/env bash
# `make bench`: moongate against nginx and HAProxy as a reverse proxy, on this machine.
#
# An nginx origin serves fixed bodies (/12: "hello world\n", /1k: 1 KiB). Each proxy runs one
# worker pinned to CPU 0; wrk and the origin are pinned to CPU 1. For each response size the
# targets run interleaved (direct, nginx, haproxy, moongate; then again) BENCH_ROUNDS times with
# `wrk -t1 -c50 --latency`; the proxy's CPU time per request comes from /proc/PID/stat of all
# its processes. Then RSS per client connection for nginx and moongate: 1,000 active keep-alive
# connections (wrk -c1000) and 10,000 idle ones (scripts/bench/idle_clients.py).
# Prints a Markdown report and saves it to bench-results/latest.md.
#
#   BENCH_DURATION=10   seconds per wrk run (default 10; 3 with BENCH_QUICK=1)
#   BENCH_QUICK=1       short runs for a smoke test
#   BENCH_ROUNDS=3      interleaved rounds
#   BENCH_CPU_PROXY=0   CPU of the proxy under test; BENCH_CPU_LOAD=1: CPU of wrk + origin
#   MOONGATE=path       binary to test (default build/moongate)
# Everything listens on 127.0.0.1 on free ports; temp files live in a mktemp dir; everything
# started here is stopped by PID on exit. If moongate cannot start, its rows say why.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
HERE=$ROOT/scripts/bench
export PATH="$PATH:/usr/sbin:/sbin"

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then DUR=${BENCH_DURATION:-3}; MEM_DUR=3; else DUR=${BENCH_DURATION:-10}; MEM_DUR=5; fi
ROUNDS=${BENCH_ROUNDS:-3}
CPU_PROXY=${BENCH_CPU_PROXY:-0}
CPU_LOAD=${BENCH_CPU_LOAD:-1}
MOONGATE=${MOONGATE:-$ROOT/build/moongate}
CONNS=50
ACTIVE_CONNS=1000
IDLE_CONNS=10000
PY=${PYTHON:-python3}
CLK_TCK=$(getconf CLK_TCK)
REPORT="$PY $HERE/report.py"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- dependencies ---------------------------------------------------------------------------
# The bench needs nginx, haproxy, wrk and taskset; if the install fails but they are present,
# go on (the nginx Lua module that deps.sh also installs is not used here).
"$ROOT/scripts/deps.sh" bench >&2 || log "scripts/deps.sh bench failed; trying with what is installed"
for tool in nginx haproxy wrk taskset curl pgrep "$PY"; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
NGINX=$(command -v nginx)
HAPROXY=$(command -v haproxy)

# Enough file descriptors for 10,000 idle connections (client side and proxy side).
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE_CONNS + 200)) ]; then
  IDLE_CONNS=$((NOFILE - 200))
  log "open-file limit is $NOFILE: idle scenario reduced to $IDLE_CONNS connections"
fi
# HAProxy needs two descriptors per proxied connection and refuses to start beyond the limit.
MAXCONN=20000
if [ "$NOFILE" != unlimited ] && [ $(((NOFILE - 100) / 2)) -lt $MAXCONN ]; then
  MAXCONN=$(((NOFILE - 100) / 2))
fi
if [ "$(nproc)" -lt 2 ]; then
  log "only one CPU: the proxy shares it with wrk and the origin; numbers are not comparable"
  CPU_PROXY=0; CPU_LOAD=0
fi

# --- process bookkeeping --------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moongate-bench.XXXXXX") || die "mktemp failed"
chmod 755 "$TMP"   # nginx workers may run as an unprivileged user
PIDS=()

alive() {  # PID -> true while it runs (a zombie counts as gone)
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}

tree_pids() {  # PID -> PID and all its descendants
  local c
  [ -d "/proc/$1" ] || return 0
  echo "$1"
  for c in $(pgrep -P "$1" 2>/dev/null); do tree_pids "$c"; done
}

tree_ticks() {  # PID -> utime+stime (clock ticks) summed over the process tree
  local sum=0 p f
  local -a a
  for p in $(tree_pids "$1"); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    f=${f##*) }
    read -r -a a <<<"$f"
    sum=$((sum + a[11] + a[12]))   # fields 14 and 15 of /proc/PID/stat
  done
  echo "$sum"
}

cpu_busy() {  # CPU -> busy clock ticks of that CPU so far (user nice system irq softirq steal)
  awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

child_ticks() {  # FILE (output of the `times` builtin) -> CPU ticks of this shell's reaped children
  awk -v hz="$CLK_TCK" 'NR == 2 {
    t = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + substr(a[2], 1, length(a[2]) - 1) }
    printf "%d\n", t * hz + 0.5 }' "$1"
}

tree_rss_kb() {  # PID -> VmRSS (KiB) summed over the process tree
  local sum=0 p v
  for p in $(tree_pids "$1"); do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

stop_tree() {  # PID -> SIGTERM to it, then SIGKILL to whatever of its tree is left after 10 s
  local pid=$1 tree p i
  alive "$pid" || return 0
  tree=$(tree_pids "$pid")
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  for p in $tree; do
    alive "$p" && kill -KILL "$p" 2>/dev/null
  done
  wait "$pid" 2>/dev/null
  return 0
}

cleanup() {
  local pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_tree "$pid"; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USED_PORTS=" "
free_port() {  # -> a TCP port on 127.0.0.1 that is free now and not handed out before
  local p
  while :; do
    p=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    USED_PORTS="$USED_PORTS$p "
    echo "$p"
    return
  done
}

render() {  # TEMPLATE OUT NAME PORT -> fills the @...@ placeholders
  local user=""
  [ "$(id -u)" = 0 ] && user="user root root;"
  sed -e "s|@TMP@|$TMP|g" -e "s|@PORT@|$4|g" -e "s|@ORIGIN@|${ORIGIN_PORT:-0}|g" \
      -e "s|@NAME@|$3|g" -e "s|@USER@|$user|g" -e "s|@BODY1K@|$BODY1K|g" \
      -e "s|@MAXCONN@|$MAXCONN|g" "$1" >"$2"
}

# wait_ready PID PORT TIMEOUT_S -> true once GET /12 answers 200 "hello world\n" and /1k 1 KiB.
wait_ready() {
  local pid=$1 port=$2 tries=$(($3 * 10)) i code size
  for ((i = 0; i < tries; i++)); do
    alive "$pid" || return 1
    code=$(curl -s -o "$TMP/probe" -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/12")
    if [ "$code" = 200 ] && [ "$(cat "$TMP/probe")" = "hello world" ]; then
      size=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 2 \
             "http://127.0.0.1:$port/1k")
      [ "$size" = "200 1024" ] && return 0
      READY_WHY="GET /1k answered '$size' (want '200 1024')"
      return 1
    fi
    sleep 0.1
  done
  READY_WHY="no correct answer to GET /12 within $3 s (last status '$code')"
  return 1
}

# start_proxy KIND NAME -> sets STARTED_PID and STARTED_PORT; on failure sets START_WHY.
start_proxy() {
  local kind=$1 name=$2 port conf tpl
  port=$(free_port)
  STARTED_PID=""
  STARTED_PORT=$port
  READY_WHY="process exited"
  case "$kind" in
    nginx)
      conf=$TMP/$name.conf
      mkdir -p "$TMP/$name-temp"
      render "$HERE/proxy-nginx.conf" "$conf" "$name" "$port"
      (exec taskset -c "$CPU_PROXY" "$NGINX" -p "$TMP/" -e "$TMP/$name-error.log" -c "$conf") \
        >"$TMP/$name.out" 2>&1 &
      STARTED_PID=$!; PIDS+=("$STARTED_PID")
      ;;
    haproxy)
      conf=$TMP/$name.cfg
      render "$HERE/haproxy.cfg" "$conf" "$name" "$port"
      (exec taskset -c "$CPU_PROXY" "$HAPROXY" -db -f "$conf") >"$TMP/$name.out" 2>&1 &
      STARTED_PID=$!; PIDS+=("$STARTED_PID")
      ;;
    moongate)
      if [ ! -x "$MOONGATE" ]; then
        START_WHY="not available ($MOONGATE not built)"
        return 1
      fi
      for tpl in moongate.lua moongate-min.lua; do
        conf=$TMP/$name-$tpl
        render "$HERE/$tpl" "$conf" "$name" "$port"
        (exec taskset -c "$CPU_PROXY" "$MOONGATE" -c "$conf" -w 1) >"$TMP/$name.out" 2>&1 &
        STARTED_PID=$!; PIDS+=("$STARTED_PID")
        if wait_ready "$STARTED_PID" "$port" 10; then
          [ "$tpl" = moongate.lua ] || log "moongate: runs with the fallback config $tpl"
          MOONGATE_CONF=$tpl
          return 0
        fi
        log "moongate with $tpl: $READY_WHY; its output:"
        tail -n 5 "$TMP/$name.out" | sed 's/^/  | /' >&2
        stop_tree "$STARTED_PID"
      done
      START_WHY="not available ($READY_WHY)"
      return 1
      ;;
  esac
  if wait_ready "$STARTED_PID" "$port" 10; then return 0; fi
  log "$kind failed to start: $READY_WHY"
  tail -n 5 "$TMP/$name.out" "$TMP/$name-error.log" 2>/dev/null | sed 's/^/  | /' >&2
  stop_tree "$STARTED_PID"
  START_WHY="not available ($READY_WHY)"
  return 1
}

# --- origin ---------------------------------------------------------------------------------
BODY1K=$($PY -c 'import string; print(((string.ascii_letters + string.digits) * 20)[:1023])')
ORIGIN_PORT=$(free_port)
mkdir -p "$TMP/origin-temp"
render "$HERE/origin-nginx.conf" "$TMP/origin.conf" origin "$ORIGIN_PORT"
(exec taskset -c "$CPU_LOAD" "$NGINX" -p "$TMP/" -e "$TMP/origin-error.log" -c "$TMP/origin.conf") \
  >"$TMP/origin.out" 2>&1 &
ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
if ! wait_ready "$ORIGIN_PID" "$ORIGIN_PORT" 10; then
  tail -n 5 "$TMP/origin.out" "$TMP/origin-error.log" 2>/dev/null >&2
  die "origin nginx did not start: $READY_WHY"
fi

# --- proxies for the throughput runs --------------------------------------------------------
declare -A PORT PID
: >"$TMP/status.tsv"
: >"$TMP/runs.tsv"
: >"$TMP/mem.tsv"
PORT[direct]=$ORIGIN_PORT
PID[direct]=""
TARGETS="direct"
for t in nginx haproxy moongate; do
  if start_proxy "$t" "$t"; then
    PORT[$t]=$STARTED_PORT; PID[$t]=$STARTED_PID
    TARGETS="$TARGETS $t"
    printf '%s\tok\n' "$t" >>"$TMP/status.tsv"
  else
    log "$t: $START_WHY"
    printf '%s\t%s\n' "$t" "$START_WHY" >>"$TMP/status.tsv"
  fi
done
log "origin :$ORIGIN_PORT; targets: $TARGETS; ${DUR}s x $ROUNDS rounds x 2 sizes"

run_wrk() {  # CONNS DURATION PORT PATH OUTFILE
  taskset -c "$CPU_LOAD" wrk -t1 -c"$1" -d"$2"s --latency "http://127.0.0.1:$3$4" >"$5" 2>&1
}

for scen in 12 1k; do
  for t in $TARGETS; do   # warm-up: JITs, pools, page faults
    run_wrk "$CONNS" 1 "${PORT[$t]}" "/$scen" "$TMP/warmup.txt"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in $TARGETS; do
      out=$TMP/wrk-$scen-$t-$round.txt
      pid=${PID[$t]}
      if [ -n "$pid" ] && ! alive "$pid"; then
        log "[$scen r$round] $t: process died; skipping"
        printf '%s\t%s\t%s\t0\t0\t0\t0\t-1\t-\t0\t0\t0\t0\t0\n' "$scen" "$t" "$round" >>"$TMP/runs.tsv"
        continue
      fi
      t0=-; t1=-
      [ -n "$pid" ] && t0=$(tree_ticks "$pid")
      o0=$(tree_ticks "$ORIGIN_PID"); l0=$(cpu_busy "$CPU_LOAD")
      b0=$(cpu_busy "$CPU_PROXY"); w0=$(date +%s%N)
      times >"$TMP/times0"   # no subshell: `times` must see this shell's children (wrk)
      run_wrk "$CONNS" "$DUR" "${PORT[$t]}" "/$scen" "$out"
      times >"$TMP/times1"
      b1=$(cpu_busy "$CPU_PROXY"); w1=$(date +%s%N)
      l1=$(cpu_busy "$CPU_LOAD"); o1=$(tree_ticks "$ORIGIN_PID")
      [ -n "$pid" ] && t1=$(tree_ticks "$pid")
      read -r req rps p50 p99 errs <<<"$($REPORT parse-wrk "$out")"
      ticks=-; own=0
      [ -n "$pid" ] && { ticks=$((t1 - t0)); own=$ticks; }
      if [ -n "$pid" ] && ! alive "$pid"; then   # died during the run: its ticks are gone
        log "[$scen r$round] $t: process died during the run"
        ticks=-; own=0
      fi
      # Ticks that other processes (other work on this machine) took on the proxy's CPU.
      other=$((b1 - b0 - own)); [ "$other" -lt 0 ] && other=0
      wrk_ticks=$(($(child_ticks "$TMP/times1") - $(child_ticks "$TMP/times0")))
      other_load=$((l1 - l0 - (o1 - o0) - wrk_ticks)); [ "$other_load" -lt 0 ] && other_load=0
      wall=$(((w1 - w0) * CLK_TCK / 1000000000))
      # runs.tsv: scenario target round requests rps p50_ms p99_ms errors proxy_ticks
      #           other_ticks_cpu_proxy wall_ticks other_ticks_cpu_load origin_ticks wrk_ticks
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$t" \
        "$round" "$req" "$rps" "$p50" "$p99" "$errs" "$ticks" "$other" "$wall" "$other_load" \
        "$((o1 - o0))" "$wrk_ticks" >>"$TMP/runs.tsv"
      log "[$scen r$round] $t: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, cpu ticks $ticks, errors $errs; ticks of other processes: CPU $CPU_PROXY $other, CPU $CPU_LOAD $other_load (of $wall; origin $((o1 - o0)), wrk $wrk_ticks)"
      [ "$req" = 0 ] && sed 's/^/  | /' "$out" | tail -n 5 >&2
    done
  done
done

for t in nginx haproxy moongate; do
  [ -n "${PID[$t]:-}" ] && stop_tree "${PID[$t]}"
done

# --- memory per connection ------------------------------------------------------------------
# Each measurement uses a fresh proxy, warmed with a short wrk run, so that neither the earlier
# runs' allocator high-water marks nor the other scenario's connections are in the baseline.
mem_row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TMP/mem.tsv"; }

for p in nginx moongate; do
  if ! grep -q "^$p	ok" "$TMP/status.tsv"; then
    continue
  fi
  # (a) active keep-alive connections: peak RSS sampled while wrk -c1000 runs.
  if start_proxy "$p" "$p-mem-active"; then
    pid=$STARTED_PID; port=$STARTED_PORT
    run_wrk "$CONNS" 1 "$port" /12 "$TMP/warmup.txt"
    sleep 1
    before=$(tree_rss_kb "$pid")
    run_wrk "$ACTIVE_CONNS" "$MEM_DUR" "$port" /12 "$TMP/mem-$p-active.txt" &
    wrk_pid=$!; PIDS+=("$wrk_pid")
    sleep 1
    peak=0
    while alive "$wrk_pid"; do
      r=$(tree_rss_kb "$pid")
      [ "$r" -gt "$peak" ] && peak=$r
      sleep 0.25
    done
    wait "$wrk_pid" 2>/dev/null
    read -r req rps p50 p99 errs <<<"$($REPORT parse-wrk "$TMP/mem-$p-active.txt")"
    note="-"
    [ "$errs" != 0 ] && note="wrk reported $errs errors"
    mem_row "$p" active "$ACTIVE_CONNS" "$before" "$peak" "$note"
    log "memory $p active: $before KiB -> peak $peak KiB with $ACTIVE_CONNS connections ($rps req/s, errors $errs)"
    stop_tree "$pid"
  else
    mem_row "$p" active 0 - - "$START_WHY"
  fi

  # (b) idle keep-alive connections: one request each, then held open.
  if start_proxy "$p" "$p-mem-idle"; then
    pid=$STARTED_PID; port=$STARTED_PORT
    run_wrk "$CONNS" 1 "$port" /12 "$TMP/warmup.txt"
    sleep 1
    before=$(tree_rss_kb "$pid")
    (exec taskset -c "$CPU_LOAD" "$PY" "$HERE/idle_clients.py" "$port" /12 "$IDLE_CONNS") \
      >"$TMP/idle-$p.out" 2>&1 &
    cl_pid=$!; PIDS+=("$cl_pid")
    for ((i = 0; i < 1500; i++)); do
      grep -q '^ready' "$TMP/idle-$p.out" && break
      alive "$cl_pid" || break
      sleep 0.1
    done
    held=0; note="-"
    if grep -q '^ready' "$TMP/idle-$p.out"; then
      sleep 1
      after=0
      for i in 1 2 3; do
        r=$(tree_rss_kb "$pid")
        [ "$r" -gt "$after" ] && after=$r
        sleep 0.3
      done
      held=$(sed -n 's/^ready ok=\([0-9]*\) .*/\1/p' "$TMP/idle-$p.out")
      failed=$(sed -n 's/^ready .*failed=\([0-9]*\).*/\1/p' "$TMP/idle-$p.out")
      stop_tree "$cl_pid"
      closed=$(sed -n 's/^held .*closed_by_peer=\([0-9]*\).*/\1/p' "$TMP/idle-$p.out")
      note=""
      [ "${failed:-0}" != 0 ] && note="$failed of $IDLE_CONNS connections failed; "
      [ "${closed:-0}" != 0 ] && note="$note$closed closed by the proxy while held; "
      note=${note%; }
      [ -n "$note" ] || note="-"
      mem_row "$p" idle "$held" "$before" "$after" "$note"
      log "memory $p idle: $before KiB -> $after KiB with $held connections ($note)"
    else
      stop_tree "$cl_pid"
      tail -n 3 "$TMP/idle-$p.out" >&2
      mem_row "$p" idle 0 - - "idle client did not finish"
    fi
    stop_tree "$pid"
  else
    mem_row "$p" idle 0 - - "$START_WHY"
  fi
done

# --- report ---------------------------------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n 1)
[ -n "$cpu" ] || cpu=$(sed -n 's/^Hardware[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n 1)
mg_ver="moongate $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -n "${MOONGATE_CONF:-}" ] && mg_ver="$mg_ver (config $MOONGATE_CONF)"
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc=$(nproc)"
  echo "cpu=${cpu:-unknown CPU}"
  echo "kernel=$(uname -r)"
  echo "versions=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $("$HAPROXY" -v 2>&1 | head -n 1 | awk '{print $1, $3}'), $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'), $mg_ver"
  echo "origin=nginx return 200 (one worker)"
  echo "duration=$DUR"
  echo "rounds=$ROUNDS"
  echo "quick=$QUICK"
  echo "clk_tck=$CLK_TCK"
  echo "cpu_proxy=$CPU_PROXY"
  echo "cpu_load=$CPU_LOAD"
  echo "loadavg=$LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
  echo "active_conns=$ACTIVE_CONNS"
  echo "idle_conns=$IDLE_CONNS"
} >"$TMP/meta.env"

$REPORT render "$TMP" >"$TMP/report.md" || die "report failed"
mkdir -p "$ROOT/bench-results"
cp "$TMP/report.md" "$ROOT/bench-results/latest.md"
# The raw inputs, so that `scripts/bench/report.py render bench-results/latest-raw` redraws it.
rm -rf "$ROOT/bench-results/latest-raw"
mkdir -p "$ROOT/bench-results/latest-raw"
cp "$TMP/meta.env" "$TMP/status.tsv" "$TMP/runs.tsv" "$TMP/mem.tsv" "$ROOT/bench-results/latest-raw/"
echo
cat "$TMP/report.md"
echo
log "saved to bench-results/latest.md"
