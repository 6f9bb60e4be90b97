#!/usr/bin/env bash
# What CI runs: formatting, lints (clippy, shellcheck), every test (unit, integration, root
# end-to-end when run as root, doc tests). Usage: scripts/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# As root on Debian, install what the end-to-end tests use when it is missing (the list in
# scripts/packages, which .ci/run installs whole), so this one command runs the whole suite on
# a fresh machine.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  need=()
  while IFS=: read -r what package; do
    if [ "${what#/}" != "$what" ]; then [ -e "$what" ] && continue
    else command -v "$what" >/dev/null && continue; fi
    need+=("$package")
  done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/packages)
  if [ ${#need[@]} -gt 0 ]; then
    echo "check.sh: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
cargo fmt --all --check
# The shell: every script and the CI entry point, warnings and errors.
if command -v shellcheck >/dev/null; then
  shellcheck -S warning scripts/*.sh .ci/run
elif [ -n "${CI:-}" ]; then
  echo "check.sh: shellcheck is missing (apt-get install shellcheck)" >&2; exit 1
else
  echo "check.sh: no shellcheck: scripts not linted" >&2
fi
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
