# syntax=docker/dockerfile:1
# One static binary for every role (proxy, controller, node-agent, crd) on distroless,
# non-root, for a read-only root file system.
#   docker build -t <registry>/pullthrough:0.1.0 .

FROM --platform=$BUILDPLATFORM rust:1-bookworm AS build
ARG TARGETARCH
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-musl > /target ;; \
      arm64) echo aarch64-unknown-linux-musl > /target ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac \
    && rustup target add "$(cat /target)"
RUN if [ "$TARGETARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pullthrough --target "$(cat /target)" \
    && cp "target/$(cat /target)/release/pullthrough" /pullthrough

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /pullthrough /pullthrough
# 65532 is distroless' "nonroot"; the node agent's DaemonSet overrides it with root.
USER 65532:65532
EXPOSE 5000 9095 9096
ENTRYPOINT ["/pullthrough"]
CMD ["proxy"]
