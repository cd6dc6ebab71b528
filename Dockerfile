# syntax=docker/dockerfile:1
# The jobcachefs CSI driver image.
#
#   docker build -t jobcachefs:0.1.0 .
#
# The builder compiles a release binary; the runtime image holds just that binary and CA
# certificates (for the Kubernetes API over TLS). The driver mounts with the mount(2)
# syscall directly, so no mount tools are needed.

FROM rust:1-bookworm AS builder
WORKDIR /build
# Everything Cargo.toml declares: build.rs compiles proto/ with protox (no protoc), and
# the [[bench]] and [[test]] targets must exist for cargo to load the manifest even
# though they are not built.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# The cache mounts keep downloaded crates and compiled dependencies between builds
# (BuildKit); the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin jobcachefs \
    && install -D -m 0755 target/release/jobcachefs /out/jobcachefs

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/jobcachefs /usr/local/bin/jobcachefs
# The node plugin runs as root in a privileged container: it mounts overlays.
ENTRYPOINT ["jobcachefs"]
CMD ["--help"]
