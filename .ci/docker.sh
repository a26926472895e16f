#!/usr/bin/env bash
# The Docker image in CI: when a Docker engine runs here, build the image (`docker build -t
# stickless:ci .`) and smoke-test it: the image's session-server, with a demo-app from the same
# image in front of it (in the server's network namespace), the health checks docker-compose.yml
# gives them, and a login through that demo-app read back from the session server. Without an
# engine, say so and succeed.
#
#   bash .ci/docker.sh
#
# Exit status: 0 when the image was built and passed the smoke test, when there is no engine,
# or when a base image (the Dockerfile's FROM lines) cannot be pulled because no registry can
# be reached (printed with the reason: CI machines reach package registries only); non-zero
# for anything else (a build error, a failed smoke test, a pull the registry itself refused).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=stickless:ci
say() { printf 'docker: %s\n' "$*"; }

if ! command -v docker >/dev/null; then
  say "no engine here, image not built (no docker command)"
  exit 0
fi
if ! engine=$(docker info 2>&1 >/dev/null); then
  say "no engine here, image not built ($(printf '%s' "$engine" | grep -m1 -iE 'cannot connect|error|denied' || echo 'docker info failed'))"
  exit 0
fi

# --- base images: pulled first, so that a registry out of reach is told apart from a build error
# The FROM lines' images, without build stages named by an earlier `AS`.
base_images() {
  awk '
    toupper($1) == "FROM" {
      i = 2
      while ($i ~ /^--/) i++
      image = $i
      if (!(image in stage)) print image
      for (j = i + 1; j <= NF; j++) if (toupper($j) == "AS") stage[$(j + 1)] = 1
    }
  ' Dockerfile | sort -u
}

# A pull error that means "no way to the registry", as opposed to the registry saying no.
unreachable() {
  grep -qiE 'dial tcp|lookup .* (no such host|server misbehaving)|i/o timeout|network is unreachable|connection refused|connection reset|TLS handshake timeout|context deadline exceeded|Client\.Timeout|temporary failure in name resolution' <<<"$1"
}

for image in $(base_images); do
  if docker image inspect "$image" >/dev/null 2>&1; then
    continue
  fi
  say "pulling base image $image"
  if ! out=$(docker pull "$image" 2>&1); then
    if unreachable "$out"; then
      say "cannot pull base image $image (no registry access): image not built"
      printf '%s\n' "$out" | tail -n 3 | sed 's/^/  /'
      exit 0
    fi
    say "pulling base image $image failed:"
    printf '%s\n' "$out" | sed 's/^/  /'
    exit 1
  fi
done

# --- build --------------------------------------------------------------------------------
say "building $IMAGE"
docker build --pull=false -t "$IMAGE" .

# --- smoke test ---------------------------------------------------------------------------
CONTAINERS=()
cleanup() {
  if [ ${#CONTAINERS[@]} -gt 0 ]; then
    docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

fail() {
  say "smoke test failed: $*"
  local id
  for id in "${CONTAINERS[@]}"; do
    echo "--- logs of container $id"
    docker logs "$id" 2>&1 | tail -n 20
  done
  exit 1
}

# until SECONDS CMD...: retries CMD until it succeeds or SECONDS pass.
until_ok() {
  local end=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.5
  done
}

say "smoke test: session-server (the image's command) and a demo-app in front of it"
# Both ports on the first container, published on free loopback ports of the host.
# The image's command listens on 0.0.0.0, so it needs a token (it refuses to start without).
server=$(docker run -d -e STICKLESS_AUTH_TOKEN=docker-smoke -p 127.0.0.1::50051 \
  -p 127.0.0.1::8080 "$IMAGE")
CONTAINERS+=("$server")
until_ok 60 sh -c "docker logs '$server' 2>/dev/null | grep -q '^listening grpc '" \
  || fail "session-server did not report its gRPC address"
app=$(docker run -d -e STICKLESS_AUTH_TOKEN=docker-smoke --network "container:$server" \
  "$IMAGE" demo-app --listen 0.0.0.0:8080 \
  --name docker-smoke --sessions store --session-server http://127.0.0.1:50051 --insecure-cookies)
CONTAINERS+=("$app")
http=$(docker port "$server" 8080/tcp | head -n 1)
[ -n "$http" ] || fail "port 8080 is not published"
until_ok 60 curl -fsS --max-time 2 "http://$http/healthz" || fail "demo-app did not answer /healthz"

# The health checks of docker-compose.yml, run in the image as Compose runs them: the server's
# own subcommand (and its failure against a port nobody serves), and deploy/compose/http-ok.sh
# with the image's bash (given on stdin: no bind mount, which a remote engine could not see).
in_image() { docker run --rm -i --network "container:$server" "$IMAGE" "$@"; }
in_image session-server healthcheck --addr http://127.0.0.1:50051 </dev/null \
  || fail "session-server healthcheck did not report SERVING"
if in_image session-server healthcheck --addr http://127.0.0.1:1 </dev/null; then
  fail "session-server healthcheck succeeded against a closed port"
fi
in_image bash -s 8080 /healthz <deploy/compose/http-ok.sh \
  || fail "deploy/compose/http-ok.sh did not see demo-app's /healthz"
if in_image bash -s 8080 /no-such-path <deploy/compose/http-ok.sh; then
  fail "deploy/compose/http-ok.sh succeeded on a 404"
fi

jar=$(mktemp)
trap 'cleanup; rm -f "$jar"' EXIT
curl -fsS --max-time 5 -c "$jar" -d user=docker-smoke "http://$http/login" >/dev/null \
  || fail "POST /login failed"
me=$(curl -fsS --max-time 5 -b "$jar" "http://$http/me") || fail "GET /me failed"
grep -q docker-smoke <<<"$me" || fail "GET /me does not know the user: $me"
docker run --rm "$IMAGE" compare --help >/dev/null || fail "compare --help failed"

say "image $IMAGE built; session-server and demo-app answered (login read back: $me)"
