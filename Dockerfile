# syntax=docker/dockerfile:1.7
# One image recipe for the three services: docker build --build-arg SERVICE=order-service .
# Dependencies compile once into a BuildKit cache mount shared by all three builds.

FROM rust:1.95-slim-bookworm AS build
ARG SERVICE
# librdkafka is built from source by rdkafka-sys (configure + make).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config python3 perl zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    test -n "$SERVICE" \
 && cargo build --release --locked --bin "$SERVICE" \
 && install -D "target/release/$SERVICE" /out/service

FROM debian:bookworm-slim AS runtime
ARG SERVICE
# curl for the healthcheck; zlib and the C/C++ runtime come with the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin saga
COPY --from=build /out/service /usr/local/bin/service
USER 10001
ENV RUST_LOG=info SERVICE_NAME=${SERVICE}
# PORT is set per service by docker-compose.yml.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=5 \
  CMD curl -fsS "http://127.0.0.1:${PORT:-3000}/health" >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/service"]
