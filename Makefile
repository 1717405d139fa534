# backupmx — the two commands: `make demo` (the main job: the outage drill on a real
# single-node Kubernetes) and `make test` (every test).
# `make deps` installs the system packages they need (Debian/Ubuntu, as root).

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: all deps build release test unit integration lint demo demo-cluster demo-standalone bench crds images chart-test node-test clean

all: build

## deps: install every system package the tests, demo and benchmark use (apt-get, root)
deps:
	bash tests/infra/deps.sh

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p mx-pod

## test: formatting, lints, unit tests and integration tests with real Postfix/smtp-sink/swaks
test: deps lint
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## demo: the main job. The operator's outage drill on a real single-node Kubernetes (kubelet,
## containerd, kube-proxy) with PowerDNS, a Postfix primary, a sending Postfix and smtp-source
## load; builds what it needs, cleans up after itself (root; ~6 min with builds, ~2 min after)
demo: deps
	bash demo/cluster.sh

## demo-cluster: the same as `make demo` (its former name)
demo-cluster: demo

## demo-standalone: no Kubernetes: one mx-pod in front of a real Postfix primary, the same drill
demo-standalone: deps release
	MXPOD_BIN=target/release/mx-pod bash demo/standalone.sh

## bench: mx-pod against Postfix as a backup MX and smtp-sink, same machine, same run
bench: deps release
	MXPOD_BIN=target/release/mx-pod bash bench/run.sh

## crds: generate crds/backupmx.yaml from the Rust types (a unit test fails when it is stale)
## and copy it into the chart (tests/tests/operator/chart.rs checks they are byte-identical)
crds:
	$(CARGO) run -q -p backupmx-operator -- crdgen > crds/backupmx.yaml
	cp crds/backupmx.yaml charts/backupmx-operator/crds/backupmx.yaml

## images: static release binaries -> target/images/{mx-pod,backupmx-operator}.tar (docker-archive,
## no registry or daemon), each built twice and compared, checked and run from its own root
## filesystem (images/build.sh; root, a few minutes). Not part of `make test`.
images:
	bash images/build.sh

## chart-test: the Helm chart's tests alone (lint, schema, render, validation, install on the
## real API server with the chart's RBAC); `make test` runs them too
chart-test: deps
	$(CARGO) test -p backupmx-tests --test operator chart

## node-test: the operator's replay and disaster scenarios with a REAL node (kubelet, containerd, runc, CNI
## bridge) running the mx-pod image (tests/tests/node/, tests/infra/node/; root). `make test`
## runs them too (the `node` test target)
node-test: deps
	$(CARGO) test -p backupmx-tests --test node

clean:
	$(CARGO) clean
