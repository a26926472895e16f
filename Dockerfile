# One image with every Stickless binary: session-server, session-proxy, demo-app and the
# comparison harness `compare` (with the real nginx and HAProxy it measures against).
#
#   docker build -t stickless .
#   docker run --rm -p 127.0.0.1:50051:50051 -e STICKLESS_AUTH_TOKEN=... stickless
#                                                            # session-server, memory store
#   docker run --rm stickless compare --help
#   docker compose up --build                                # the demo cluster (docker-compose.yml)
#
# Every binary takes its settings as flags or STICKLESS_* / DEMO_* environment variables; in a
# container, listen on 0.0.0.0 (the defaults are loopback only). session-server refuses a
# non-loopback address without authentication: give it STICKLESS_AUTH_TOKEN, a mounted
# STICKLESS_AUTH_TOKEN_FILE, or TLS client certificates (--tls-client-ca).

# --- build: the whole workspace in release mode ---------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The .proto is compiled by protox (pure Rust) and ring needs only the C compiler the image
# has: no extra packages. Any source change rebuilds from here (.dockerignore keeps target/ and
# .git/ out of the context).
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/session-server target/release/session-proxy \
       target/release/demo-app target/release/compare /out/

# --- run ----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: https:// session servers; nginx and haproxy: the comparison's anchors
# (`compare` runs them itself, in the foreground, inside its work directory; the packages'
# services are never started in an image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates nginx haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/stickless --create-home \
      --shell /usr/sbin/nologin stickless
COPY --from=builder /out/ /usr/local/bin/
USER stickless
WORKDIR /var/lib/stickless
# 50051: session-server gRPC; 8080: session-proxy or demo-app HTTP.
EXPOSE 50051 8080
# The default command's probe (grpc.health.v1 SERVING: the server is up and its store answers);
# containers running another binary of the image set their own (docker-compose.yml does).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["session-server", "healthcheck", "--addr", "http://127.0.0.1:50051"]
CMD ["session-server", "--listen", "0.0.0.0:50051"]
