#!/usr/bin/env bash
# What CI runs: formatting, lints, every test (unit, integration, root end-to-end when run as
# root, doc tests). Usage: scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
cargo test --locked --doc
