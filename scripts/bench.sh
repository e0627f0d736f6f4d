#!/usr/bin/env bash
# `make bench`: moongate against nginx and HAProxy as a reverse proxy, on this machine.
#
# An nginx origin serves fixed bodies (/12: "hello world\n", /1k: 1 KiB). Each proxy runs one
# worker pinned to CPU 0; wrk and the origin are pinned to CPU 1. For each response size the
# targets run interleaved (direct, nginx, haproxy, moongate; then in reverse order, and so on)
# BENCH_ROUNDS times with `wrk -t1 -c50 --latency`; the proxy's CPU time per request comes
# from /proc/PID/stat of all its processes. Then RSS per client connection for nginx and moongate: 1,000 active keep-alive
# connections (wrk -c1000) and 10,000 idle ones (scripts/bench/idle_clients.py).
# Then moongate against nginx + lua-nginx-module (Debian's libnginx-mod-http-lua) doing the same
# Lua work, interleaved the same way, one worker each on CPU 0:
#   apikey: GET /a, an access hook checks X-Api-Key among 100 keys (401 JSON otherwise), counts
#           the request per key in a shared dictionary, proxies to the origin (1 KiB) with the
#           forwarding headers and request id moongate adds; wrk cycles through the keys
#           (scripts/bench/wrk-apikey.lua). Both answer every request with X-Request-Id.
#   agg:    GET /b fetches /users/1, /orders/1 and /reviews/1 (JSON) from the origin in parallel
#           and answers one merged JSON document (moongate: mg.aggregate; nginx: capture_multi
#           + lua-cjson).
#   aggtables: GET /b2, the same document built by hand in moongate: mg.fetch_all, each body
#           decoded into Lua tables, one table encoded (nginx: the same as /b).
# Configs: scripts/bench/moongate-lua.lua and nginx-lua.conf. Last, reload latency: a 100-route
# config, 10 reloads that each add a route; time from `moongate reload` (or SIGHUP to the master
# when this build has no reload command) until the new route answers 200; nginx's SIGHUP reload
# as the reference (scripts/bench/reload_latency.py).
# Prints a Markdown report and saves it to bench-results/latest.md.
#
#   BENCH_DURATION=10   seconds per wrk run (default 10; 3 with BENCH_QUICK=1)
#   BENCH_QUICK=1       short runs for a smoke test
#   BENCH_ROUNDS=3      interleaved rounds
#   BENCH_CPU_PROXY=0   CPU of the proxy under test; BENCH_CPU_LOAD=1: CPU of wrk + origin
#   MOONGATE=path       binary to test (default build/moongate)
#   BENCH_SCENARIOS="proxy mem lua reload"   the parts to run (default: all)
#   BENCH_RELOADS=10    reloads for the reload-latency figure
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
SCENARIOS=" ${BENCH_SCENARIOS:-proxy mem lua reload} "
RELOADS=${BENCH_RELOADS:-10}
want() { case "$SCENARIOS" in *" $1 "*) return 0 ;; esac; return 1; }
CLK_TCK=$(getconf CLK_TCK)
REPORT="$PY $HERE/report.py"

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- dependencies ---------------------------------------------------------------------------
# The bench needs nginx, haproxy, wrk and taskset; if the install fails but they are present,
# go on. The Lua scenarios also need the nginx Lua module and lua-cjson; without them only their
# nginx + Lua rows are missing (the report says why).
"$ROOT/scripts/deps.sh" bench >&2 || log "scripts/deps.sh bench failed; trying with what is installed"
for tool in nginx haproxy wrk taskset curl pgrep "$PY"; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
NGINX=$(command -v nginx)
HAPROXY=$(command -v haproxy)
# lua-nginx-module (and the NDK it needs) as dynamic modules, and lua-cjson for LuaJIT (5.1).
NGINX_MODULES=""
for d in /usr/share/nginx/modules /usr/lib/nginx/modules; do
  if [ -f "$d/ngx_http_lua_module.so" ] && [ -f "$d/ndk_http_module.so" ]; then
    NGINX_MODULES=$d; break
  fi
done
LUA_CJSON=$(ls /usr/lib/*/lua/5.1/cjson.so /usr/local/lib/lua/5.1/cjson.so 2>/dev/null | head -n 1)
LUA_CPATH=""
[ -n "$LUA_CJSON" ] && LUA_CPATH="$(dirname "$LUA_CJSON")/?.so"

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
      -e "s|@MAXCONN@|$MAXCONN|g" -e "s|@NGINX_MODULES@|$NGINX_MODULES|g" \
      -e "s|@LUA_CPATH@|$LUA_CPATH|g" -e "s|@KEYS_SET@|${KEYS_SET:-}|g" \
      -e "s|@KEYS_LIST@|${KEYS_LIST:-}|g" "$1" >"$2"
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
# KIND: nginx, haproxy, moongate (plain proxies); nginx-lua, moongate-lua (the Lua scenarios);
# nginx-reload, moongate-reload (the reload figure: the template is kept as $TMP/NAME.tpl and
# reload_latency.py writes the config, STARTED_CONF, from it).
start_proxy() {
  local kind=$1 name=$2 port conf tpl
  port=$(free_port)
  STARTED_PID=""
  STARTED_PORT=$port
  STARTED_CONF=""
  READY_WHY="process exited"
  case "$kind" in
    nginx|nginx-lua|nginx-reload)
      conf=$TMP/$name.conf
      mkdir -p "$TMP/$name-temp"
      case "$kind" in
        nginx) render "$HERE/proxy-nginx.conf" "$conf" "$name" "$port" ;;
        nginx-lua)
          if [ -z "$NGINX_MODULES" ] || [ -z "$LUA_CPATH" ]; then
            START_WHY="not available (the nginx Lua module or lua-cjson is not installed)"
            return 1
          fi
          render "$HERE/nginx-lua.conf" "$conf" "$name" "$port" ;;
        nginx-reload)
          render "$HERE/reload-nginx.conf" "$TMP/$name.tpl" "$name" "$port"
          $PY "$HERE/reload_latency.py" write nginx "$TMP/$name.tpl" "$conf" 0 ;;
      esac
      STARTED_CONF=$conf
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
    moongate-lua|moongate-reload)
      if [ ! -x "$MOONGATE" ]; then
        START_WHY="not available ($MOONGATE not built)"
        return 1
      fi
      conf=$TMP/$name.lua
      if [ "$kind" = moongate-lua ]; then
        render "$HERE/moongate-lua.lua" "$conf" "$name" "$port"
      else
        render "$HERE/reload-moongate.lua" "$TMP/$name.tpl" "$name" "$port"
        $PY "$HERE/reload_latency.py" write moongate "$TMP/$name.tpl" "$conf" 0
      fi
      STARTED_CONF=$conf
      (exec taskset -c "$CPU_PROXY" "$MOONGATE" -c "$conf" -w 1) >"$TMP/$name.out" 2>&1 &
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
PROXY_KINDS="nginx haproxy moongate"; PROXY_SIZES="12 1k"
want proxy || { PROXY_KINDS=""; PROXY_SIZES=""; }
for t in $PROXY_KINDS; do
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

run_wrk() {  # CONNS DURATION PORT PATH OUTFILE [WRK_LUA_SCRIPT]
  taskset -c "$CPU_LOAD" wrk -t1 -c"$1" -d"$2"s --latency ${6:+-s "$6"} \
    "http://127.0.0.1:$3$4" >"$5" 2>&1
}

# measure SCEN TARGET ROUND PORT PID PATH [WRK_LUA_SCRIPT] -> one wrk run of DUR seconds; appends
# its row to runs.tsv. PID empty: no proxy (direct), no proxy CPU.
measure() {
  local scen=$1 t=$2 round=$3 port=$4 pid=$5 path=$6 script=${7:-}
  local out=$TMP/wrk-$scen-$t-$round.txt
  local t0=- t1=- o0 o1 l0 l1 b0 b1 w0 w1 req rps p50 p99 errs ticks own other wrk_ticks
  local other_load wall
  if [ -n "$pid" ] && ! alive "$pid"; then
    log "[$scen r$round] $t: process died; skipping"
    printf '%s\t%s\t%s\t0\t0\t0\t0\t-1\t-\t0\t0\t0\t0\t0\n' "$scen" "$t" "$round" >>"$TMP/runs.tsv"
    return
  fi
  [ -n "$pid" ] && t0=$(tree_ticks "$pid")
  o0=$(tree_ticks "$ORIGIN_PID"); l0=$(cpu_busy "$CPU_LOAD")
  b0=$(cpu_busy "$CPU_PROXY"); w0=$(date +%s%N)
  times >"$TMP/times0"   # no subshell: `times` must see this shell's children (wrk)
  run_wrk "$CONNS" "$DUR" "$port" "$path" "$out" "$script"
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
  return 0
}

# round_order ROUND TARGET... -> the targets in the order round ROUND runs them: as given in odd
# rounds, reversed in even ones (A B, B A, A B, ...), so that a machine that drifts slower or
# faster through a scenario does not always favour the target that runs first.
round_order() {
  local round=$1 out="" t
  shift
  if ((round % 2)); then echo "$@"; return; fi
  for t in "$@"; do out="$t $out"; done
  echo $out
}

for scen in $PROXY_SIZES; do
  for t in $TARGETS; do   # warm-up: JITs, pools, page faults
    run_wrk "$CONNS" 1 "${PORT[$t]}" "/$scen" "$TMP/warmup.txt"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in $(round_order "$round" $TARGETS); do
      measure "$scen" "$t" "$round" "${PORT[$t]}" "${PID[$t]}" "/$scen"
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

MEM_KINDS="nginx moongate"
want mem || MEM_KINDS=""
for p in $MEM_KINDS; do
  if want proxy && ! grep -q "^$p	ok" "$TMP/status.tsv"; then
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

# --- Lua scenarios: moongate against nginx + lua-nginx-module --------------------------------
# One process per target serves both scenarios (moongate-lua.lua, nginx-lua.conf), started
# fresh here. Each scenario is first checked for the right answers; a target that fails a check
# is left out of that scenario and the report gives the reason.
: >"$TMP/lua-status.tsv"
: >"$TMP/reload.tsv"
lua_status() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$TMP/lua-status.tsv"; }  # SCEN TARGET ok|WHY

# The 100 API keys, the same in both configs and in the wrk script (which cycles through them).
KEYS_LIST=$($PY -c 'import hashlib
print(" ".join("\"%s\"," % hashlib.sha256(b"moongate-bench-key-%d" % i).hexdigest()[:32]
               for i in range(100)))')
KEYS_SET=$(printf '%s' "$KEYS_LIST" | sed 's/"\([0-9a-f]*\)",/["\1"] = true,/g')
FIRST_KEY=$(printf '%s' "$KEYS_LIST" | sed 's/^"\([0-9a-f]*\)".*/\1/')
render "$HERE/wrk-apikey.lua" "$TMP/wrk-apikey.lua" wrk 0

# proxy_error NAME -> the first script error the proxy NAME logged (moongate's output or nginx's
# error log), without the temp dir's path; empty if none.
proxy_error() {
  { grep -a -h -o 'hook failed: .*' "$TMP/$1.out" 2>/dev/null
    grep -a -h '\[error\]' "$TMP/$1-error.log" 2>/dev/null | sed 's/^.*\[error\] [0-9#]*: \*[0-9]* //'
  } | head -n 1 | sed "s|$TMP/||g" | cut -c1-240
}

# check_apikey PORT -> true when a known key gets 200 with the 1 KiB body, no key or an unknown
# key gets 401 with a JSON body, and the known key's counter is 1; otherwise sets CHECK_WHY.
check_apikey() {
  local port=$1 r h
  r=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 5 \
      -H "X-Api-Key: $FIRST_KEY" "http://127.0.0.1:$port/a")
  if [ "$r" != "200 1024" ]; then
    CHECK_WHY="GET /a with a known key answered '$r' (want '200 1024')"
    return 1
  fi
  for h in "" "X-Api-Key: not-a-key"; do
    r=$(curl -s -o "$TMP/probe" -w '%{http_code} %{content_type}' --max-time 5 ${h:+-H "$h"} \
        "http://127.0.0.1:$port/a")
    case "$r" in
      "401 application/json"*) grep -q '"bad key"' "$TMP/probe" && continue ;;
    esac
    CHECK_WHY="GET /a ${h:-without a key} answered '$r' '$(head -c 80 "$TMP/probe")' (want 401 JSON)"
    return 1
  done
  # The one good request above was counted: GET /count shows the key's counter.
  r=$(curl -s --max-time 5 -H "X-Api-Key: $FIRST_KEY" "http://127.0.0.1:$port/count")
  if ! printf '%s' "$r" | $PY -c 'import json, sys; sys.exit(json.load(sys.stdin).get("n") != 1)' \
       2>/dev/null; then
    CHECK_WHY="after one GET /a with a key, GET /count answered '$(printf '%s' "$r" | head -c 80)' (want {\"n\":1})"
    return 1
  fi
  return 0
}

# check_agg PORT NAME [PATH] -> true when GET PATH (/b) answers 200 with the merged document; otherwise sets
# CHECK_WHY, with the script error the proxy logged if there is one.
check_agg() {
  local port=$1 name=$2 path=${3:-/b} code why err
  code=$(curl -s -o "$TMP/probe" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port$path")
  why=$($REPORT check-agg "$TMP/probe")
  [ "$code" = 200 ] && [ "$why" = ok ] && return 0
  sleep 0.2   # let the proxy write its log line
  err=$(proxy_error "$name")
  if [ -z "$err" ]; then
    CHECK_WHY="GET $path answered $code: $why"
  else
    CHECK_WHY="GET $path answered $code; its log: $err"
  fi
  case "$err" in
    *"field 'fetch_all' (a nil value)"*) CHECK_WHY="$CHECK_WHY: mg.fetch_all is not in this build" ;;
  esac
  return 1
}

LUA_KINDS="nginx-lua moongate"
want lua || LUA_KINDS=""
declare -A LPORT LPID
for t in $LUA_KINDS; do
  kind=$t; [ "$t" = moongate ] && kind=moongate-lua
  if ! start_proxy "$kind" "$t-lua"; then
    log "$t (Lua scenarios): $START_WHY"
    lua_status apikey "$t" "$START_WHY"; lua_status agg "$t" "$START_WHY"
    continue
  fi
  LPORT[$t]=$STARTED_PORT; LPID[$t]=$STARTED_PID
  if check_apikey "$STARTED_PORT"; then lua_status apikey "$t" ok
  else log "$t: apikey: $CHECK_WHY"; lua_status apikey "$t" "not available ($CHECK_WHY)"; fi
  if check_agg "$STARTED_PORT" "$t-lua"; then lua_status agg "$t" ok
  else log "$t: agg: $CHECK_WHY"; lua_status agg "$t" "not available ($CHECK_WHY)"; fi
  if check_agg "$STARTED_PORT" "$t-lua" /b2; then lua_status aggtables "$t" ok
  else log "$t: aggtables: $CHECK_WHY"; lua_status aggtables "$t" "not available ($CHECK_WHY)"; fi
done

for scen in $([ -n "$LUA_KINDS" ] && echo apikey agg aggtables); do
  case $scen in
    apikey) path=/a; script=$TMP/wrk-apikey.lua ;;
    agg) path=/b; script="" ;;
    aggtables) path=/b2; script="" ;;
  esac
  lt=""
  for t in $LUA_KINDS; do
    grep -q "^$scen	$t	ok\$" "$TMP/lua-status.tsv" && lt="$lt $t"
  done
  [ -n "$lt" ] || continue
  log "Lua scenario $scen: targets:$lt; ${DUR}s x $ROUNDS rounds"
  for t in $lt; do   # warm-up: JITs, pools, page faults
    run_wrk "$CONNS" 1 "${LPORT[$t]}" "$path" "$TMP/warmup.txt" "$script"
  done
  for ((round = 1; round <= ROUNDS; round++)); do
    for t in $(round_order "$round" $lt); do
      measure "$scen" "$t" "$round" "${LPORT[$t]}" "${LPID[$t]}" "$path" "$script"
    done
  done
done
for t in $LUA_KINDS; do
  [ -n "${LPID[$t]:-}" ] && stop_tree "${LPID[$t]}"
done

# --- reload latency ---------------------------------------------------------------------------
# A fresh proxy with 100 routes (reload-moongate.lua, reload-nginx.conf as the reference); each
# of RELOADS rounds rewrites the config with one more route, GET /new/N, asks for a reload and
# polls that route every ms (reload_latency.py, on CPU_LOAD) until it answers 200.
# reload.tsv: TARGET round N MS CMD_RC CMD_MS | TARGET method TEXT | TARGET fail WHY
RELOAD_KINDS="moongate nginx"
want reload || RELOAD_KINDS=""
for t in $RELOAD_KINDS; do
  if ! start_proxy "$t-reload" "$t-reload"; then
    log "$t (reload): $START_WHY"
    printf '%s\tfail\t%s\n' "$t" "$START_WHY" >>"$TMP/reload.tsv"
    continue
  fi
  pid=$STARTED_PID; port=$STARTED_PORT; conf=$STARTED_CONF
  if [ "$t" = nginx ]; then
    how=(--hup "$pid"); method="SIGHUP to the master (nginx -s reload)"
  elif "$MOONGATE" --help 2>&1 | grep -qw reload; then
    how=(--cmd "$MOONGATE" reload -c "$conf"); method="\`moongate reload -c FILE\`"
  else
    how=(--hup "$pid")
    method="SIGHUP to the master (this build has no \`moongate reload\` command)"
  fi
  printf '%s\tmethod\t%s\n' "$t" "$method" >>"$TMP/reload.tsv"
  log "reload latency, $t: $RELOADS reloads by $method"
  taskset -c "$CPU_LOAD" $PY "$HERE/reload_latency.py" measure "${t}" "$TMP/$t-reload.tpl" \
    "$conf" "$port" "$RELOADS" 3 "${how[@]}" >"$TMP/reload-$t.out" 2>&1
  sed -n 's/^round \([0-9]*\) ms \([0-9.]*\) cmd_rc \([^ ]*\) cmd_ms \([^ ]*\)$/'"$t"'\tround\t\1\t\2\t\3\t\4/p' \
    "$TMP/reload-$t.out" >>"$TMP/reload.tsv"
  last=$(tail -n 1 "$TMP/reload-$t.out")
  if [ "$last" != ok ]; then
    why=${last#fail }
    # What the proxy said about the signal, if anything (e.g. a build without live reload).
    said=$(grep -a -h -i 'SIGHUP\|reload' "$TMP/$t-reload.out" "$TMP/$t-reload-error.log" 2>/dev/null |
           tail -n 1 | sed -e "s|$TMP/||g" -e 's/^.*\] \(pid=[0-9]* \)\{0,1\}//' | cut -c1-200)
    [ -n "$said" ] && why="$why; its log: $said"
    log "reload latency, $t: $why"
    printf '%s\tfail\t%s\n' "$t" "$why" >>"$TMP/reload.tsv"
  fi
  sed 's/^/  | /' "$TMP/reload-$t.out" >&2
  stop_tree "$pid"
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
  echo "lua_versions=lua-nginx-module $(dpkg-query -W -f='${Version}' libnginx-mod-http-lua 2>/dev/null || echo '?'), lua-cjson $(dpkg-query -W -f='${Version}' lua-cjson 2>/dev/null || echo '?')"
  echo "scenarios=$(echo $SCENARIOS)"
  echo "reloads=$RELOADS"
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
cp "$TMP/meta.env" "$TMP/status.tsv" "$TMP/runs.tsv" "$TMP/mem.tsv" "$TMP/lua-status.tsv" \
  "$TMP/reload.tsv" "$ROOT/bench-results/latest-raw/"
echo
cat "$TMP/report.md"
echo
log "saved to bench-results/latest.md"
