# syntax=docker/dockerfile:1.7
#
# The agent and controller images, for linux/amd64 and linux/arm64:
#
#   docker buildx build --platform linux/amd64,linux/arm64 --target agent \
#     --build-arg VERSION=0.1.0 -t <registry>/packet-capture-agent:0.1.0 --push .
#   (and --target controller; `make images` does both)
#
# The builder runs on the build machine's platform and cross-compiles for each
# target platform with Debian's cross toolchain and that platform's libpcap
# (`cargo xtask cross-check` does the same for arm64 without Docker). The eBPF
# programs are compiled for bpfel: the kernel's byte order on amd64 and arm64.
#
# BINARIES=prebuilt takes the binaries built outside the image instead, from
# the build context `bin` (<arch>/packet-capture-{agent,controller}):
# `cargo xtask images` builds them on the host and runs buildah with
# `--build-arg BINARIES=prebuilt --build-context bin=target/images/bin`.
# The builder stage is then not built.

ARG RUST_VERSION=1.98
ARG DEBIAN_RELEASE=bookworm
ARG BINARIES=builder

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG BUILDARCH
ARG TARGETARCH
WORKDIR /src
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

# Debian's LLVM 22 for bpf-linker; the target architecture's C toolchain and
# libpcap (the agent links libpcap for tcpdump filters and its fallback
# backend, the controller for checking filters in the webhook).
RUN if [ "$TARGETARCH" != "$BUILDARCH" ]; then dpkg --add-architecture "$TARGETARCH"; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      llvm-22-dev pkg-config "crossbuild-essential-$TARGETARCH" "libpcap0.8-dev:$TARGETARCH" \
 && rm -rf /var/lib/apt/lists/*

# The eBPF toolchain pinned in packet-capture-ebpf/rust-toolchain.toml, and
# bpf-linker built against LLVM 22.
COPY packet-capture-ebpf/rust-toolchain.toml /tmp/ebpf-toolchain/rust-toolchain.toml
RUN cd /tmp/ebpf-toolchain && rustup toolchain install \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version '^0.13' --locked \
      --no-default-features --features llvm-22

# Where cargo, cc and pkg-config find each target's toolchain; on the build
# machine's own architecture these are its native tools.
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    PKG_CONFIG_aarch64_unknown_linux_gnu=aarch64-linux-gnu-pkg-config \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    AR_x86_64_unknown_linux_gnu=x86_64-linux-gnu-ar \
    PKG_CONFIG_x86_64_unknown_linux_gnu=x86_64-linux-gnu-pkg-config

COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=packet-capture-target-${TARGETARCH} \
    case "$TARGETARCH" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && rustup target add "$target" \
 && cargo build --release --locked --target "$target" \
      -p packet-capture-agent -p packet-capture-controller \
 && mkdir -p /out \
 && cp "target/$target/release/packet-capture-agent" "target/$target/release/packet-capture-controller" /out/

# Binaries built outside the image, one directory per architecture.
FROM scratch AS prebuilt
ARG TARGETARCH
COPY --from=bin ${TARGETARCH}/packet-capture-agent ${TARGETARCH}/packet-capture-controller /out/

# Where the images take the binaries from: the builder or prebuilt. (The
# WORKDIR gives the stage an instruction: buildah 1.28 leaves a stage that
# has none mounted after the build.)
FROM ${BINARIES} AS binaries
WORKDIR /out

# The runtime: Debian slim with libpcap (both binaries link it dynamically).
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpcap0.8 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# What both images say about themselves. (A stage of its own: `cargo xtask
# images` keeps the runtime cached and rebuilds this with each version.)
FROM runtime AS labelled
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/packet-capture/packet-capture
ARG REVISION=unknown
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="packet-capture"

# The node agent. It runs as root (uid 0) so that it can write the capture
# directory on the host, with only the capabilities the DaemonSet grants.
FROM labelled AS agent
LABEL org.opencontainers.image.title="packet-capture-agent" \
      org.opencontainers.image.description="Captures packets on a node with eBPF (libpcap fallback) and serves the agent API"
COPY --from=binaries /out/packet-capture-agent /usr/local/bin/packet-capture-agent
USER 0:0
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/packet-capture-agent"]

# The controller, as an unprivileged user.
FROM labelled AS controller
LABEL org.opencontainers.image.title="packet-capture-controller" \
      org.opencontainers.image.description="Reconciles PacketCaptureConfigs, drives the agents and serves the validating webhook"
COPY --from=binaries /out/packet-capture-controller /usr/local/bin/packet-capture-controller
USER 65532:65532
EXPOSE 8443 8081
ENTRYPOINT ["/usr/local/bin/packet-capture-controller"]
