# Build: docker build -t gpu-coordinator .
# Run:   docker run -p 8080:8080 -e GPU_COORDINATOR_NATS__URL=nats://... gpu-coordinator
#        (or `docker compose up`, which starts NATS, Redis and Postgres beside it)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gpu-coordinator

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --uid 10001 gpu-coordinator
COPY --from=build /src/target/release/gpu-coordinator /usr/local/bin/gpu-coordinator
COPY config.example.toml /etc/gpu-coordinator/config.toml
# Inside a container, loopback is unreachable from outside: listen on every interface.
ENV GPU_COORDINATOR_HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
USER gpu-coordinator
ENTRYPOINT ["gpu-coordinator"]
CMD ["serve", "--config", "/etc/gpu-coordinator/config.toml"]
