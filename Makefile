# packet-capture: build, test and operate. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
# The eBPF crate is built for the BPF target by the agent's build script; lint
# it there with the pinned toolchain.
EBPF_CLIPPY := cd packet-capture-ebpf && $(CARGO) clippy --release --target bpfel-unknown-none -Z build-std=core -- -D warnings

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install what building and testing need (idempotent; run as root)
	$(CARGO) xtask setup

.PHONY: build
build: ## Build every binary (release)
	$(CARGO) build --release --workspace

.PHONY: lint
lint: ## cargo fmt --check, clippy -D warnings (user space and eBPF), CRD drift
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --exclude packet-capture-ebpf --all-targets -- -D warnings
	$(EBPF_CLIPPY)
	$(CARGO) xtask crdgen --check

.PHONY: test
test: setup lint ## Set up, then run every test (as root: the tests use BPF and network namespaces)
	$(CARGO) test --workspace --exclude packet-capture-ebpf --no-fail-fast

.PHONY: demo
demo: setup ## Set up, start a local control plane with simulated nodes, run a capture, show it
	$(CARGO) xtask demo
