# keyflow container image: multi-stage build, small non-root runtime image.
#
#   docker build -t keyflow .
#
# The builder compiles the same binary the tests use (`cargo build --release --locked`: the
# bundled librdkafka, linked against the system OpenSSL for SSL/SASL_SSL and SCRAM; libssl-dev
# comes with the rust image). The runtime image carries libssl3 and the CA bundle, so keyflow
# connects to TLS clusters (Confluent Cloud, MSK, Aiven, Strimzi). Not built here: this machine
# runs no Docker engine (see README "Operating keyflow").
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin keyflow \
    && strip target/release/keyflow

FROM debian:bookworm-slim AS runtime
# libssl3 and ca-certificates for TLS to brokers; curl for the health check.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libssl3 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin keyflow
COPY --from=build /src/target/release/keyflow /usr/local/bin/keyflow
COPY pipelines /app/pipelines
WORKDIR /app
USER 10001:10001
ENV KEYFLOW_LOG_FORMAT=json \
    KEYFLOW_HTTP__ADDRESS=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9464/health/live || exit 1
ENTRYPOINT ["/usr/local/bin/keyflow"]
CMD ["run", "/app/pipelines"]
