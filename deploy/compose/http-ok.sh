#!/usr/bin/env bash
# The health check of the demo cluster's HTTP services (docker-compose.yml mounts this file):
#
#   bash http-ok.sh PORT PATH [TOKEN_VAR]
#
# Exit status 0 when `GET http://127.0.0.1:PORT/PATH` answers 200, 1 for any other status, a
# refused connection or no status line within 5 seconds. TOKEN_VAR names an environment
# variable holding a bearer token sent as `Authorization: Bearer ...` (the proxy's admin API):
# the name is on the command line, never the token.
#
# The Stickless image has no curl or wget (debian:bookworm-slim plus ca-certificates, nginx and
# haproxy), and adding one for a health check is more than it needs: bash, which the base image
# always has, opens the connection itself (/dev/tcp), and only builtins run after that.
set -u
[ $# -ge 2 ] || { echo "usage: http-ok.sh PORT PATH [TOKEN_VAR]" >&2; exit 1; }
port=$1 path=$2 auth=
if [ $# -ge 3 ] && [ -n "${!3-}" ]; then
  auth="Authorization: Bearer ${!3}"$'\r\n'
fi
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n%sConnection: close\r\n\r\n' \
  "$path" "$port" "$auth" >&3 || exit 1
IFS= read -r -t 5 status <&3 || exit 1
status=${status%$'\r'}
case $status in
  "HTTP/1."[01]" 200" | "HTTP/1."[01]" 200 "*) exit 0 ;;
  *) echo "GET $path: ${status:-no status line}" >&2; exit 1 ;;
esac
