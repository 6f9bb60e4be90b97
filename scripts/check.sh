#!/usr/bin/env bash
# What CI runs: formatting, lints, every test (unit, integration, root end-to-end when run as
# root, doc tests). Usage: scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
# The BPF object is committed (cargo build needs no clang); where clang is, rebuild it and prove
# the committed bytes are what the source compiles to.
if command -v clang >/dev/null && command -v llvm-strip >/dev/null; then
  bpf_tmp=$(mktemp -d)
  scripts/build-bpf.sh "$bpf_tmp"
  for o in "$bpf_tmp"/*.o; do
    cmp "$o" "src/agent/bpf/progs/$(basename "$o")" ||
      { echo "src/agent/bpf/progs/$(basename "$o") is stale: run scripts/build-bpf.sh" >&2; exit 1; }
  done
  rm -rf "$bpf_tmp"
else
  echo "check.sh: no clang/llvm-strip: committed BPF object not rebuilt" >&2
fi
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
# The cluster suite again with the kernel data path (root only: namespaces, cgroup2, BPF).
if [ "$(id -u)" -eq 0 ]; then
  L4LB_TEST_DATA_PLANE=bpf cargo test --locked --test it cluster::
fi
cargo test --locked --doc
