#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the tier conformance suite, and the integration
# tests that start the real larderd binary on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins
cargo test --locked --workspace "$@"
