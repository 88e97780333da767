# packet-capture: build, test and operate. `make help` lists the targets.
#
# The operating targets (deploy, status, logs-*, restart, destroy) use the
# current kubectl context; KUBECTL="kubectl --context other" picks another.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
KUBECTL ?= kubectl
# Namespace the controller and the agents run in: the manifests' (and the
# chart's default, the release namespace, as the README installs it); set it
# for a Helm release elsewhere, e.g. NAMESPACE=kube-system.
NAMESPACE ?= packet-capture
# Images: <IMAGE_REGISTRY>/packet-capture-{agent,controller}:<TAG>.
IMAGE_REGISTRY ?= ghcr.io/packet-capture
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
PLATFORMS ?= linux/amd64,linux/arm64
# --push uploads the multi-arch images; use `--load PLATFORMS=linux/amd64` for a local image.
IMAGE_OUTPUT ?= --push
SOURCE ?= https://github.com/packet-capture/packet-capture
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# logs-*: lines per pod, and FOLLOW=1 to follow.
TAIL ?= 200
FOLLOW ?=
# How long destroy waits for the controller to finish deleting captures.
TIMEOUT ?= 120s
# The eBPF crate is built for the BPF target by the agent's build script; lint
# it there with the pinned toolchain.
EBPF_CLIPPY := cd packet-capture-ebpf && $(CARGO) clippy --release --target bpfel-unknown-none -Z build-std=core -- -D warnings
CRD := packetcaptureconfigs.networking.packet.io
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Install what building and testing need (idempotent; run as root)
	# The workspace's toolchain (rust-toolchain.toml) before the first cargo
	# call: rustup installs it on demand only where RUSTUP_AUTO_INSTALL allows.
	rustup toolchain install
	$(CARGO) xtask setup

.PHONY: build
build: ## Build every binary (release)
	$(CARGO) build --release --workspace

.PHONY: lint
lint: ## cargo fmt --check, clippy -D warnings (user space and eBPF), CRD and manifests drift
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --exclude packet-capture-ebpf --all-targets -- -D warnings
	$(EBPF_CLIPPY)
	$(CARGO) xtask crdgen --check
	$(CARGO) xtask manifests --check

.PHONY: test
test: setup lint ## Set up, then run every test (as root: the tests use BPF and network namespaces), then cross-build arm64
	# The images' release build (both platforms, each binary optimised as a
	# whole on one core: most of a first run's build time) starts at the
	# lowest CPU priority beside the tests, most of which wait on packets and
	# the API server; the image tests find it done or wait for the rest.
	mkdir -p "$(TARGET_DIR)"
	nice -n 19 $(CARGO) xtask images --binaries-only > "$(TARGET_DIR)/images-binaries.log" 2>&1 &
	$(CARGO) test --workspace --exclude packet-capture-ebpf --no-fail-fast
	# --release: the images' arm64 build, which the image tests made already.
	$(CARGO) xtask cross-check --release

.PHONY: demo
demo: setup ## Set up, start a local control plane with simulated nodes, run a capture, show it
	$(CARGO) xtask demo

.PHONY: manifests
manifests: ## Render the Helm chart into manifests/ (commit the result)
	$(CARGO) xtask manifests

.PHONY: cross-check
cross-check: ## Cross-compile the agent and controller for arm64 and check the binaries
	$(CARGO) xtask cross-check

.PHONY: images
images: ## Build (and push) the multi-arch images: IMAGE_REGISTRY, TAG, PLATFORMS, IMAGE_OUTPUT
	for component in agent controller; do \
		docker buildx build --platform $(PLATFORMS) --target $$component \
			--build-arg VERSION=$(TAG) --build-arg SOURCE=$(SOURCE) --build-arg REVISION=$(REVISION) \
			--tag $(IMAGE_REGISTRY)/packet-capture-$$component:$(TAG) \
			$(IMAGE_OUTPUT) . ; \
	done

.PHONY: images-local
images-local: ## Build both images here with buildah, no Docker (cargo xtask images; IMAGE_REGISTRY, TAG; LOAD=1 imports into containerd)
	$(CARGO) xtask images $(if $(LOAD),--load)

.PHONY: deploy
deploy: ## Install with kubectl in the README's order (the webhook and the agents' cert-manager CA only if cert-manager is installed)
	$(KUBECTL) apply -f crd/packet_capture_config_crd.yaml
	$(KUBECTL) wait --for=condition=Established --timeout=60s crd/$(CRD)
	$(KUBECTL) apply -f manifests/00-namespace.yaml
	$(KUBECTL) apply -f manifests/rbac.yaml
	$(KUBECTL) apply -f manifests/config.yaml
	$(KUBECTL) apply -f manifests/controller/deployment.yaml
	$(KUBECTL) apply -f manifests/agent/daemonset.yaml
	@if $(KUBECTL) api-resources --api-group=cert-manager.io -o name | grep -q '^certificates\.'; then \
		echo "$(KUBECTL) apply -f manifests/webhook.yaml -f manifests/agent/ca.yaml"; \
		$(KUBECTL) apply -f manifests/webhook.yaml -f manifests/agent/ca.yaml; \
	else \
		echo "cert-manager is not installed: skipped manifests/webhook.yaml and manifests/agent/ca.yaml (install cert-manager, then apply them); the controller signs the agents' certificates with its own CA"; \
		echo "WARNING: without the webhook nothing checks a capture's targets: whoever may create a PacketCaptureConfig captures any pod's traffic, and kubectl pcap fetch/stream have no API. helm install has the webhook without cert-manager (self-managed certificates)." >&2; \
	fi

.PHONY: status
status: ## Show the controller, the agents, their pods and the captures
	$(KUBECTL) get deployment/packet-capture-controller daemonset/packet-capture-agent -n $(NAMESPACE) -o wide
	$(KUBECTL) get pods -n $(NAMESPACE) -l 'app in (packet-capture-controller,packet-capture-agent)' -o wide
	$(KUBECTL) get packetcaptureconfigs

.PHONY: logs-controller
logs-controller: ## Logs of the controller pods (TAIL=n lines, FOLLOW=1 to follow)
	$(KUBECTL) logs -n $(NAMESPACE) -l app=packet-capture-controller --prefix --tail=$(TAIL) $(if $(FOLLOW),--follow)

.PHONY: logs-agent
logs-agent: ## Logs of every agent pod (TAIL=n lines, FOLLOW=1 to follow)
	$(KUBECTL) logs -n $(NAMESPACE) -l app=packet-capture-agent --prefix --tail=$(TAIL) --max-log-requests=1000 $(if $(FOLLOW),--follow)

.PHONY: restart
restart: ## Restart the controller and the agents (they re-read the ConfigMap)
	$(KUBECTL) rollout restart deployment/packet-capture-controller daemonset/packet-capture-agent -n $(NAMESPACE)

# The namespace goes last of what is in it; deleting it also removes what the
# controller made there (results ConfigMaps, its Lease, its Secrets).
.PHONY: destroy
destroy: ## Delete every capture, then everything deploy installed (its namespace too), in reverse order
	@if $(KUBECTL) get crd $(CRD) >/dev/null 2>&1; then \
		echo "$(KUBECTL) delete packetcaptureconfigs --all --timeout=$(TIMEOUT)"; \
		$(KUBECTL) delete packetcaptureconfigs --all --timeout=$(TIMEOUT); \
	fi
	$(KUBECTL) delete validatingwebhookconfiguration/packet-capture-webhook mutatingwebhookconfiguration/packet-capture-webhook apiservice/v1.pcap.packet.io --ignore-not-found
	$(KUBECTL) delete -n $(NAMESPACE) service/packet-capture-webhook secret/packet-capture-webhook-tls --ignore-not-found
	@if $(KUBECTL) api-resources --api-group=cert-manager.io -o name | grep -q '^certificates\.'; then \
		echo "$(KUBECTL) delete -n $(NAMESPACE) certificate/packet-capture-webhook issuer/packet-capture-selfsigned --ignore-not-found"; \
		$(KUBECTL) delete -n $(NAMESPACE) certificate/packet-capture-webhook issuer/packet-capture-selfsigned --ignore-not-found; \
	fi
	$(KUBECTL) delete --ignore-not-found -f manifests/agent/daemonset.yaml
	$(KUBECTL) delete --ignore-not-found -f manifests/controller/deployment.yaml
	$(KUBECTL) delete --ignore-not-found -f manifests/config.yaml
	$(KUBECTL) delete --ignore-not-found -f manifests/rbac.yaml
	$(KUBECTL) delete --ignore-not-found --timeout=$(TIMEOUT) -f manifests/00-namespace.yaml
	$(KUBECTL) delete --ignore-not-found -f crd/packet_capture_config_crd.yaml
