# syntax=docker/dockerfile:1
# The jobcachefs CSI driver image.
#
#   docker build -t jobcachefs:0.1.0 .
#
# The builder compiles a release binary; the runtime image holds that binary, CA
# certificates (for the Kubernetes API over TLS) and e2fsprogs. The driver still mounts
# with the mount(2) syscall and attaches loop devices with ioctls, so no mount tools are
# needed; but a cache with a size lives in an ext4 image file, which only e2fsprogs can
# format (mkfs.ext4) and grow offline (e2fsck, resize2fs).

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
    && apt-get install -y --no-install-recommends ca-certificates e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/jobcachefs /usr/local/bin/jobcachefs
# The node plugin runs as root in a privileged container: it mounts overlays and cache
# images on loop devices.
ENTRYPOINT ["jobcachefs"]
CMD ["--help"]
