#!/usr/bin/env bash
# The demo cluster of docker-compose.yml as local processes, for machines without a Docker
# engine: the same demo app behind three front doors, so you can log in through each, stop the
# backend you are on, and see who keeps the session.
#
#   scripts/demo.sh [--store memory|redis] [--redis-url URL] [--port-base N] [--build] [--keep-logs]
#
#   --store memory   (default) one session server with the in-memory store
#   --store redis    two session servers on one Redis (--redis-url, default
#                    redis://127.0.0.1:6379 when it answers; otherwise a private redis-server)
#   --port-base N    first port (default 8080): doors N, N+1, N+2; admin API N+3; backends
#                    N+10..N+16; session servers N+20, N+21; private Redis N+30
#   --build          run `cargo build --release` even when the binaries exist
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
    --keep-logs) KEEP_LOGS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
case $STORE in memory | redis) ;; *) die "--store must be memory or redis, not $STORE" ;; esac
[[ $PORT_BASE =~ ^[0-9]+$ ]] && [ "$PORT_BASE" -ge 1024 ] && [ "$PORT_BASE" -le 65000 ] \
  || die "--port-base must be a number from 1024 to 65000"

PROXY_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
HAPROXY_PORT=$((PORT_BASE + 2))
ADMIN_PORT=$((PORT_BASE + 3))
APP_PORTS=($((PORT_BASE + 10)) $((PORT_BASE + 11)) $((PORT_BASE + 12)))
IPHASH_PORTS=($((PORT_BASE + 13)) $((PORT_BASE + 14)))
STICKY_PORTS=($((PORT_BASE + 15)) $((PORT_BASE + 16)))
SERVER_PORTS=($((PORT_BASE + 20)) $((PORT_BASE + 21)))
PRIVATE_REDIS_PORT=$((PORT_BASE + 30))

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

pid_of() {
  local i
  for i in "${!NAMES[@]}"; do
    if [ "${NAMES[$i]}" = "$1" ]; then echo "${PIDS[$i]}"; fi
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# wait_for NAME SECONDS CMD...: until CMD succeeds; fails when NAME's process exits or time is up.
wait_for() {
  local name=$1 seconds=$2
  shift 2
  local end=$((SECONDS + seconds)) pid
  pid=$(pid_of "$name")
  until "$@"; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$RUN/$name.log" >&2 || true
      die "$name exited during start-up (log above)"
    fi
    if [ "$SECONDS" -ge "$end" ]; then
      tail -n 20 "$RUN/$name.log" >&2 || true
      die "$name did not come up within ${seconds}s (log above)"
    fi
    sleep 0.2
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
ports=("$PROXY_PORT" "$ADMIN_PORT" "${APP_PORTS[@]}" "${SERVER_PORTS[@]}")
[ -n "$NGINX" ] && ports+=("$NGINX_PORT" "${IPHASH_PORTS[@]}")
[ -n "$HAPROXY" ] && ports+=("$HAPROXY_PORT" "${STICKY_PORTS[@]}")
for port in "${ports[@]}"; do
  ! port_open "$port" || die "port $port is in use (choose others with --port-base)"
done

BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
if [ "$BUILD" = 1 ] || [ ! -x "$BIN/session-server" ] || [ ! -x "$BIN/session-proxy" ] \
  || [ ! -x "$BIN/demo-app" ]; then
  echo "building release binaries (cargo build --release)"
  (cd "$ROOT" && cargo build --release -p session-server -p demo -p proxy-plugin --bins)
fi

# --- sessions -----------------------------------------------------------------------------
SERVER_URLS=()
if [ "$STORE" = memory ]; then
  start session-server-1 "$BIN/session-server" --listen "127.0.0.1:${SERVER_PORTS[0]}"
  wait_for session-server-1 30 port_open "${SERVER_PORTS[0]}"
  SERVER_URLS=("http://127.0.0.1:${SERVER_PORTS[0]}" "http://127.0.0.1:${SERVER_PORTS[0]}")
else
  redis_answers() { # redis_answers HOST PORT
    command -v redis-cli >/dev/null && redis-cli -h "$1" -p "$2" ping 2>/dev/null | grep -q PONG
  }
  url=${REDIS_URL:-redis://127.0.0.1:6379}
  hostport=${url#redis://}
  hostport=${hostport%%/*}
  if [ -z "$REDIS_URL" ] && ! redis_answers "${hostport%:*}" "${hostport##*:}"; then
    command -v redis-server >/dev/null \
      || die "--store redis: no Redis at $url and no redis-server to start (apt-get install redis-server)"
    start redis redis-server --bind 127.0.0.1 --port "$PRIVATE_REDIS_PORT" --save "" \
      --appendonly no --notify-keyspace-events Ex
    wait_for redis 30 redis_answers 127.0.0.1 "$PRIVATE_REDIS_PORT"
    url=redis://127.0.0.1:$PRIVATE_REDIS_PORT
  fi
  for i in 0 1; do
    start "session-server-$((i + 1))" "$BIN/session-server" --listen "127.0.0.1:${SERVER_PORTS[$i]}" \
      --store redis --redis-url "$url" --redis-prefix stickless-demo
    wait_for "session-server-$((i + 1))" 30 port_open "${SERVER_PORTS[$i]}"
    SERVER_URLS+=("http://127.0.0.1:${SERVER_PORTS[$i]}")
  done
fi

# --- the plugin door: session-proxy + three stateless backends -----------------------------
# The apps write through session server 2 and the proxy reads through session server 1 (the
# same server with --store memory): with Redis, either sees the other's writes.
backend_flags=()
for i in 0 1 2; do
  name=app-$((i + 1))
  start "$name" "$BIN/demo-app" --listen "127.0.0.1:${APP_PORTS[$i]}" --name "$name" \
    --sessions proxy --session-server "${SERVER_URLS[1]}" --insecure-cookies
  backend_flags+=(--backend "http://127.0.0.1:${APP_PORTS[$i]},name=$name")
done
for i in 0 1 2; do
  wait_for "app-$((i + 1))" 30 http_ok "http://127.0.0.1:${APP_PORTS[$i]}/healthz"
done
start session-proxy "$BIN/session-proxy" --listen "127.0.0.1:$PROXY_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" "${backend_flags[@]}" --balance round-robin \
  --health-check http:/healthz --health-interval 1s \
  --session-lookup "${SERVER_URLS[0]}" --session-namespace demo --session-attr cart
wait_for session-proxy 30 http_ok "http://127.0.0.1:$PROXY_PORT/healthz"

# --- the nginx and HAProxy doors: backends with local sessions ------------------------------
local_backends() { # local_backends PREFIX PORT...: starts them, prints their addresses
  local prefix=$1 i=0 port
  shift
  for port in "$@"; do
    i=$((i + 1))
    start "$prefix-$i" "$BIN/demo-app" --listen "127.0.0.1:$port" --name "$prefix-$i" \
      --sessions local --insecure-cookies
  done
  i=0
  for port in "$@"; do
    i=$((i + 1))
    wait_for "$prefix-$i" 30 http_ok "http://127.0.0.1:$port/healthz"
  done
}

if [ -n "$NGINX" ]; then
  local_backends local-iphash "${IPHASH_PORTS[@]}"
  dir=$RUN/nginx
  mkdir -p "$dir"
  render "$ROOT/deploy/nginx-ip-hash.conf" "$dir/nginx.conf" "127.0.0.1:$NGINX_PORT" "$dir" \
    "127.0.0.1:${IPHASH_PORTS[0]}" "127.0.0.1:${IPHASH_PORTS[1]}"
  start nginx "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;'
  wait_for nginx 30 http_ok "http://127.0.0.1:$NGINX_PORT/healthz"
fi
if [ -n "$HAPROXY" ]; then
  local_backends local-sticky "${STICKY_PORTS[@]}"
  dir=$RUN/haproxy
  mkdir -p "$dir"
  render "$ROOT/deploy/haproxy-sticky.cfg" "$dir/haproxy.cfg" "127.0.0.1:$HAPROXY_PORT" "$dir" \
    "127.0.0.1:${STICKY_PORTS[0]}" "127.0.0.1:${STICKY_PORTS[1]}"
  start haproxy "$HAPROXY" -f "$dir/haproxy.cfg" -db
  wait_for haproxy 30 http_ok "http://127.0.0.1:$HAPROXY_PORT/healthz"
fi

# --- what to do now -------------------------------------------------------------------------
echo
echo "Stickless demo is up (store: $STORE). Front doors:"
echo "  plugin  http://127.0.0.1:$PROXY_PORT   session-proxy + session-lookup -> app-1..3 (sessions in the store)"
if [ -n "$NGINX" ]; then
  echo "  nginx   http://127.0.0.1:$NGINX_PORT   ip_hash -> local-iphash-1, -2 (sessions inside one backend)"
else
  echo "  nginx   not installed: no ip_hash door (Debian: apt-get install nginx)"
fi
if [ -n "$HAPROXY" ]; then
  echo "  haproxy http://127.0.0.1:$HAPROXY_PORT   sticky cookie SRV -> local-sticky-1, -2 (sessions inside one backend)"
else
  echo "  haproxy not installed: no sticky-cookie door (Debian: apt-get install haproxy)"
fi
echo "  admin   http://127.0.0.1:$ADMIN_PORT/backends   (session-proxy's backends)"
echo
echo "Try:  curl -c jar -d user=alice http://127.0.0.1:$PROXY_PORT/login"
echo "      curl -b jar http://127.0.0.1:$PROXY_PORT/me      # served_by names the backend"
echo "      kill <pid of that backend>, then /me again       # the plugin door keeps you logged in"
echo "nginx believes X-Forwarded-For from 127.0.0.1: add -H 'X-Forwarded-For: 203.0.113.9' to play"
echo "another user. Use one cookie jar per door (cookies ignore ports)."
echo
echo "Processes (logs in $RUN):"
for i in "${!NAMES[@]}"; do printf '  %-18s pid %s\n' "${NAMES[$i]}" "${PIDS[$i]}"; done
echo
echo "Ctrl-C stops everything."

# Watch the processes: report the ones that exit (a demo stops backends on purpose).
declare -A reported=()
while :; do
  for i in "${!PIDS[@]}"; do
    if [ -z "${reported[$i]:-}" ] && ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      reported[$i]=1
      echo "${NAMES[$i]} (pid ${PIDS[$i]}) has exited"
    fi
  done
  sleep 1 &
  wait $! || true
done
