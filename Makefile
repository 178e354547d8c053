# The two set-up commands of the README:
#   make run   installs what Hangar needs, builds it, and runs `uname -a` in a VM
#   make test  installs what Hangar needs and runs the test suite (real VMs)
CARGO ?= cargo

.PHONY: deps build run test install bench lint

deps:
	scripts/install-deps.sh

build: deps
	$(CARGO) build --release -p hangar-cli

run: build
	./target/release/hangar run -- uname -a

test: deps
	$(CARGO) test --workspace

install: deps
	$(CARGO) install --locked --path crates/hangar-cli

bench: build
	./target/release/hangar bench boot --runs 10 && ./target/release/hangar bench exec && ./target/release/hangar bench store

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
