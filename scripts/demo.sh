#!/usr/bin/env bash
# The demo cluster of docker-compose.yml as local processes, for machines without a Docker
# engine: the same demo app behind three front doors, so you can log in through each, stop the
# backend you are on, and see who keeps the session.
#
#   scripts/demo.sh [--store memory|redis] [--redis-url URL] [--port-base N] [--build]
#                   [--bin-dir DIR] [--ready-file FILE] [--keep-logs]
#
#   --store memory   (default) one session server with the in-memory store
#   --store redis    two session servers on one Redis (--redis-url, default
#                    redis://127.0.0.1:6379 when it answers; otherwise a private redis-server)
#   --port-base N    first port (default 8080): doors N, N+1, N+2; admin API N+3; backends
#                    N+10..N+16; session servers N+20, N+21; private Redis N+30.
#                    --port-base 0: every process on a free port instead (the project's
#                    binaries bind port 0 and report theirs; Redis, nginx and HAProxy get a
#                    free port, and another when it is taken first); the addresses are printed
#   --build          run `cargo build --release` even when the binaries exist
#   --bin-dir DIR    use session-server, demo-app and session-proxy from DIR (e.g. target/debug)
#                    instead of target/release; never builds
#   --ready-file F   once everything is up, write F (whole, at once) with one line per door,
#                    backend and process: `door NAME URL`, `admin URL`, `backend NAME URL`,
#                    `proc NAME PID`, `run DIR` (for scripts and tests)
#   --keep-logs      keep the run directory (logs, nginx/haproxy configs) after stopping
#
# Front doors (all on 127.0.0.1):
#   N    session-proxy, round-robin, session-lookup plugin -> app-1..3 (`--sessions proxy`)
#   N+1  nginx ip_hash, deploy/nginx-ip-hash.conf -> local-iphash-1, -2 (`--sessions local`);
#        only when nginx is installed (Debian: apt-get install nginx)
#   N+2  HAProxy sticky cookie, deploy/haproxy-sticky.cfg -> local-sticky-1, -2
#        (`--sessions local`); only when haproxy is installed (apt-get install haproxy)
# Ctrl-C (or SIGTERM) stops every process it started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STORE=memory
REDIS_URL=
PORT_BASE=8080
BUILD=0
BIN_DIR=
READY_FILE=
KEEP_LOGS=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "demo: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --store) STORE=${2:?--store needs memory or redis}; shift 2 ;;
    --redis-url) REDIS_URL=${2:?--redis-url needs a URL}; shift 2 ;;
    --port-base) PORT_BASE=${2:?--port-base needs a port}; shift 2 ;;
    --build) BUILD=1; shift ;;
    --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift 2 ;;
    --ready-file) READY_FILE=${2:?--ready-file needs a file name}; shift 2 ;;
    --keep-logs) KEEP_LOGS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
case $STORE in memory | redis) ;; *) die "--store must be memory or redis, not $STORE" ;; esac
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] \
  || { [ "$PORT_BASE" != 0 ] && { [ "$PORT_BASE" -lt 1024 ] || [ "$PORT_BASE" -gt 65000 ]; }; }; then
  die "--port-base must be 0 (free ports) or a number from 1024 to 65000"
fi
[ -z "$BIN_DIR" ] || [ -d "$BIN_DIR" ] || die "--bin-dir $BIN_DIR is not a directory"

# port OFFSET: the port at PORT_BASE + OFFSET, or 0 (any free port) with --port-base 0.
port() { if [ "$PORT_BASE" = 0 ]; then echo 0; else echo $((PORT_BASE + $1)); fi; }
PROXY_PORT=$(port 0)
NGINX_PORT=$(port 1)
HAPROXY_PORT=$(port 2)
ADMIN_PORT=$(port 3)
APP_PORTS=("$(port 10)" "$(port 11)" "$(port 12)")
IPHASH_PORTS=("$(port 13)" "$(port 14)")
STICKY_PORTS=("$(port 15)" "$(port 16)")
SERVER_PORTS=("$(port 20)" "$(port 21)")
PRIVATE_REDIS_PORT=$(port 30)

# --- processes ----------------------------------------------------------------------------
NAMES=() # what each started process is, same index as PIDS
PIDS=()
RUN=$(mktemp -d "${TMPDIR:-/tmp}/stickless-demo.XXXXXX")

cleanup() {
  local status=$?
  trap '' INT TERM
  if [ ${#PIDS[@]} -gt 0 ]; then
    echo
    echo "stopping ${#PIDS[@]} processes"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    local end=$((SECONDS + 10)) pid
    for pid in "${PIDS[@]}"; do
      while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
    done
    kill -KILL "${PIDS[@]}" 2>/dev/null || true
    # Anything they started in turn (nginx workers stop with their master; this is a net):
    # when this script leads its process group (an interactive start), signal the group.
    if [ "$(ps -o pgid= -p $$ 2>/dev/null | tr -d ' ')" = "$$" ]; then
      kill -TERM -- -$$ 2>/dev/null || true
    fi
    wait 2>/dev/null || true
  fi
  if [ "$KEEP_LOGS" = 1 ]; then
    echo "logs kept in $RUN"
  else
    rm -rf "$RUN"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background, its output in $RUN/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$RUN/$name.log" 2>&1 &
  NAMES+=("$name")
  PIDS+=($!)
}

pid_of() { # the last process started under that name
  local i pid=
  for i in "${!NAMES[@]}"; do
    if [ "${NAMES[$i]}" = "$1" ]; then pid=${PIDS[$i]}; fi
  done
  echo "$pid"
}

forget_last() { # the last process started has exited: stop tracking it
  unset 'NAMES[-1]' 'PIDS[-1]'
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# try_wait_for NAME SECONDS CMD...: until CMD succeeds (status 0); status 1 when NAME's process
# exits first, 2 when time is up.
try_wait_for() {
  local name=$1 seconds=$2
  shift 2
  local end=$((SECONDS + seconds)) pid
  pid=$(pid_of "$name")
  until "$@"; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    if [ "$SECONDS" -ge "$end" ]; then return 2; fi
    sleep 0.2
  done
}

# wait_for NAME SECONDS CMD...: try_wait_for, stopping the demo (NAME's log shown) on failure.
wait_for() {
  local name=$1 status=0
  try_wait_for "$@" || status=$?
  [ "$status" = 0 ] && return
  tail -n 20 "$RUN/$name.log" >&2 || true
  if [ "$status" = 1 ]; then die "$name exited during start-up (log above)"; fi
  die "$name did not come up within ${2}s (log above)"
}

# reported NAME ROLE: the address NAME printed in its `listening ROLE ADDR` line (every
# Stickless binary prints one per listener once it is bound, port 0 included); fails before.
reported() { sed -n "s/^listening $2 \([0-9.:]*\)\$/\1/p" "$RUN/$1.log" | tail -n 1 | grep .; }

has_reported() { reported "$@" >/dev/null; }

# await_address NAME ROLE: waits for NAME's ROLE address and sets ADDR to it.
await_address() {
  wait_for "$1" 30 has_reported "$1" "$2"
  ADDR=$(reported "$1" "$2")
}

# free_port: a loopback port nobody listens on right now (bound and released: someone may take
# it before our process binds it, hence on_free_port).
free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local port _
  for _ in 1 2 3 4 5 6 7 8 9 10; do # no python3: below the kernel's ephemeral range
    port=$((20000 + RANDOM % 12000))
    port_open "$port" || { echo "$port"; return; }
  done
  die "found no free port"
}

# on_free_port NAME PORT STARTER...: runs `STARTER... PORT` (it starts NAME listening on PORT and
# returns once it answers, status 1 when it exited, 2 when too slow) and sets PORT_USED. PORT 0:
# on a free port, and on another one (5 tries) when NAME's logs say the port was taken first.
on_free_port() {
  local name=$1 wanted=$2 try port status
  shift 2
  for try in 1 2 3 4 5; do
    port=$wanted
    [ "$port" = 0 ] && port=$(free_port)
    rm -f "$RUN/$name"/*.log # only this try's messages decide
    status=0
    "$@" "$port" || status=$?
    if [ "$status" = 0 ]; then
      PORT_USED=$port
      return
    fi
    if [ "$wanted" = 0 ] && [ "$status" = 1 ] && [ "$try" -lt 5 ] \
      && cat "$RUN/$name.log" "$RUN/$name"/*.log 2>/dev/null | grep -q 'Address already in use'; then
      echo "demo: $name found port $port taken; trying another" >&2
      forget_last
      continue
    fi
    tail -n 20 "$RUN/$name.log" "$RUN/$name"/*.log >&2 2>/dev/null || true
    if [ "$status" = 1 ]; then die "$name exited during start-up (log above)"; fi
    die "$name did not come up within 30s (log above)"
  done
}

# render TEMPLATE OUT LISTEN WORKDIR BACKEND...: a deploy/ template filled in the way
# bench/src/external.rs fills it (one line per backend for lines holding {{BACKEND}}).
render() {
  local template=$1 out=$2 listen=$3 workdir=$4
  shift 4
  local user='# not started as root: nginx runs as the caller'"'"'s user'
  [ "$(id -u)" = 0 ] && user='user root;'
  awk -v backends="$*" -v listen="$listen" -v workdir="$workdir" -v user="$user" '
    /\{\{BACKEND\}\}/ {
      n = split(backends, b, " ")
      for (i = 1; i <= n; i++) {
        line = $0
        gsub(/\{\{BACKEND\}\}/, b[i], line)
        gsub(/\{\{NAME\}\}/, "s" i, line)
        print line
      }
      next
    }
    { gsub(/\{\{LISTEN\}\}/, listen); gsub(/\{\{WORKDIR\}\}/, workdir); gsub(/\{\{USER\}\}/, user); print }
  ' "$template" >"$out"
}

find_sbin() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true; }

# --- checks -------------------------------------------------------------------------------
command -v curl >/dev/null || die "curl is needed (Debian: apt-get install curl)"
NGINX=$(find_sbin nginx)
HAPROXY=$(find_sbin haproxy)
if [ "$PORT_BASE" != 0 ]; then
  ports=("$PROXY_PORT" "$ADMIN_PORT" "${APP_PORTS[@]}" "${SERVER_PORTS[@]}")
  [ -n "$NGINX" ] && ports+=("$NGINX_PORT" "${IPHASH_PORTS[@]}")
  [ -n "$HAPROXY" ] && ports+=("$HAPROXY_PORT" "${STICKY_PORTS[@]}")
  for port in "${ports[@]}"; do
    ! port_open "$port" || die "port $port is in use (choose others with --port-base)"
  done
fi

if [ -n "$BIN_DIR" ]; then
  BIN=$(cd "$BIN_DIR" && pwd)
  for binary in session-server session-proxy demo-app; do
    [ -x "$BIN/$binary" ] || die "--bin-dir $BIN has no $binary"
  done
else
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
  if [ "$BUILD" = 1 ] || [ ! -x "$BIN/session-server" ] || [ ! -x "$BIN/session-proxy" ] \
    || [ ! -x "$BIN/demo-app" ]; then
    echo "building release binaries (cargo build --release)"
    (cd "$ROOT" && cargo build --release -p session-server -p demo -p proxy-plugin --bins)
  fi
fi

# --- sessions -----------------------------------------------------------------------------
SERVER_URLS=()
if [ "$STORE" = memory ]; then
  start session-server-1 "$BIN/session-server" --listen "127.0.0.1:${SERVER_PORTS[0]}"
  await_address session-server-1 grpc
  SERVER_URLS=("http://$ADDR" "http://$ADDR")
else
  redis_answers() { # redis_answers HOST PORT
    command -v redis-cli >/dev/null && redis-cli -h "$1" -p "$2" ping 2>/dev/null | grep -q PONG
  }
  start_redis() { # start_redis PORT
    start redis redis-server --bind 127.0.0.1 --port "$1" --save "" --appendonly no \
      --notify-keyspace-events Ex
    try_wait_for redis 30 redis_answers 127.0.0.1 "$1"
  }
  url=${REDIS_URL:-redis://127.0.0.1:6379}
  hostport=${url#redis://}
  hostport=${hostport%%/*}
  if [ -z "$REDIS_URL" ] && ! redis_answers "${hostport%:*}" "${hostport##*:}"; then
    command -v redis-server >/dev/null \
      || die "--store redis: no Redis at $url and no redis-server to start (apt-get install redis-server)"
    on_free_port redis "$PRIVATE_REDIS_PORT" start_redis
    url=redis://127.0.0.1:$PORT_USED
  fi
  for i in 0 1; do
    start "session-server-$((i + 1))" "$BIN/session-server" --listen "127.0.0.1:${SERVER_PORTS[$i]}" \
      --store redis --redis-url "$url" --redis-prefix stickless-demo
  done
  for i in 0 1; do
    await_address "session-server-$((i + 1))" grpc
    SERVER_URLS+=("http://$ADDR")
  done
fi

# --- the plugin door: session-proxy + three stateless backends -----------------------------
# The apps write through session server 2 and the proxy reads through session server 1 (the
# same server with --store memory): with Redis, either sees the other's writes.
BACKENDS=() # `NAME ADDRESS` of every demo-app, for --ready-file
# start_backends PREFIX PORT... -- FLAG...: demo-apps PREFIX-1.. on those ports (0: any) with the
# flags; waits until each answers; sets STARTED to their addresses.
start_backends() {
  local prefix=$1 ports=() i
  shift
  while [ "$1" != -- ]; do ports+=("$1"); shift; done
  shift
  for i in "${!ports[@]}"; do
    start "$prefix-$((i + 1))" "$BIN/demo-app" --listen "127.0.0.1:${ports[$i]}" \
      --name "$prefix-$((i + 1))" --insecure-cookies "$@"
  done
  STARTED=()
  for i in "${!ports[@]}"; do
    await_address "$prefix-$((i + 1))" http
    wait_for "$prefix-$((i + 1))" 30 http_ok "http://$ADDR/healthz"
    STARTED+=("$ADDR")
    BACKENDS+=("$prefix-$((i + 1)) $ADDR")
  done
}

start_backends app "${APP_PORTS[@]}" -- --sessions proxy --session-server "${SERVER_URLS[1]}"
backend_flags=()
for i in 0 1 2; do
  backend_flags+=(--backend "http://${STARTED[$i]},name=app-$((i + 1))")
done
start session-proxy "$BIN/session-proxy" --listen "127.0.0.1:$PROXY_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" "${backend_flags[@]}" --balance round-robin \
  --health-check http:/healthz --health-interval 1s \
  --session-lookup "${SERVER_URLS[0]}" --session-attr cart
await_address session-proxy proxy
PROXY_ADDR=$ADDR
await_address session-proxy admin
ADMIN_ADDR=$ADDR
wait_for session-proxy 30 http_ok "http://$PROXY_ADDR/healthz"

# --- the nginx and HAProxy doors: backends with local sessions ------------------------------
start_nginx() { # start_nginx PORT (in front of STARTED)
  local dir=$RUN/nginx
  mkdir -p "$dir"
  render "$ROOT/deploy/nginx-ip-hash.conf" "$dir/nginx.conf" "127.0.0.1:$1" "$dir" "${STARTED[@]}"
  start nginx "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;'
  try_wait_for nginx 30 http_ok "http://127.0.0.1:$1/healthz"
}
start_haproxy() { # start_haproxy PORT (in front of STARTED)
  local dir=$RUN/haproxy
  mkdir -p "$dir"
  render "$ROOT/deploy/haproxy-sticky.cfg" "$dir/haproxy.cfg" "127.0.0.1:$1" "$dir" "${STARTED[@]}"
  start haproxy "$HAPROXY" -f "$dir/haproxy.cfg" -db
  try_wait_for haproxy 30 http_ok "http://127.0.0.1:$1/healthz"
}

DOORS=("plugin http://$PROXY_ADDR") # `NAME URL` of every door, for --ready-file
if [ -n "$NGINX" ]; then
  start_backends local-iphash "${IPHASH_PORTS[@]}" -- --sessions local
  on_free_port nginx "$NGINX_PORT" start_nginx
  NGINX_ADDR=127.0.0.1:$PORT_USED
  DOORS+=("nginx http://$NGINX_ADDR")
fi
if [ -n "$HAPROXY" ]; then
  start_backends local-sticky "${STICKY_PORTS[@]}" -- --sessions local
  on_free_port haproxy "$HAPROXY_PORT" start_haproxy
  HAPROXY_ADDR=127.0.0.1:$PORT_USED
  DOORS+=("haproxy http://$HAPROXY_ADDR")
fi

# --- what to do now -------------------------------------------------------------------------
echo
echo "Stickless demo is up (store: $STORE). Front doors:"
echo "  plugin  http://$PROXY_ADDR   session-proxy + session-lookup -> app-1..3 (sessions in the store)"
if [ -n "$NGINX" ]; then
  echo "  nginx   http://$NGINX_ADDR   ip_hash -> local-iphash-1, -2 (sessions inside one backend)"
else
  echo "  nginx   not installed: no ip_hash door (Debian: apt-get install nginx)"
fi
if [ -n "$HAPROXY" ]; then
  echo "  haproxy http://$HAPROXY_ADDR   sticky cookie SRV -> local-sticky-1, -2 (sessions inside one backend)"
else
  echo "  haproxy not installed: no sticky-cookie door (Debian: apt-get install haproxy)"
fi
echo "  admin   http://$ADMIN_ADDR/backends   (session-proxy's backends)"
echo
echo "Try:  curl -c jar -d user=alice http://$PROXY_ADDR/login"
echo "      curl -b jar http://$PROXY_ADDR/me      # served_by names the backend"
echo "      kill <pid of that backend>, then /me again       # the plugin door keeps you logged in"
echo "nginx believes X-Forwarded-For from 127.0.0.1: add -H 'X-Forwarded-For: 203.0.113.9' to play"
echo "another user. Use one cookie jar per door (cookies ignore ports)."
echo
echo "Processes (logs in $RUN):"
for i in "${!NAMES[@]}"; do printf '  %-18s pid %s\n' "${NAMES[$i]}" "${PIDS[$i]}"; done
echo
echo "Ctrl-C stops everything."

if [ -n "$READY_FILE" ]; then
  {
    for door in "${DOORS[@]}"; do echo "door $door"; done
    echo "admin http://$ADMIN_ADDR"
    for backend in "${BACKENDS[@]}"; do
      echo "backend ${backend% *} http://${backend#* }"
    done
    for i in "${!NAMES[@]}"; do echo "proc ${NAMES[$i]} ${PIDS[$i]}"; done
    echo "run $RUN"
  } >"$READY_FILE.tmp.$$"
  mv "$READY_FILE.tmp.$$" "$READY_FILE"
fi

# Watch the processes: report the ones that exit (a demo stops backends on purpose).
declare -A exited=()
while :; do
  for i in "${!PIDS[@]}"; do
    if [ -z "${exited[$i]:-}" ] && ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      exited[$i]=1
      echo "${NAMES[$i]} (pid ${PIDS[$i]}) has exited"
    fi
  done
  sleep 1 &
  wait $! || true
done
