#!/usr/bin/env bash
# Compile the BPF programs (src/agent/bpf/progs/*.bpf.c) into the objects committed beside them.
# Usage: scripts/build-bpf.sh [OUTDIR]   (default: beside the sources)
# DWARF is stripped (BTF stays): the object then holds no build paths, so the same clang gives
# the same bytes anywhere, which is how scripts/check.sh proves the committed object matches.
set -euo pipefail
cd "$(dirname "$0")/.."
src=src/agent/bpf/progs
out=${1:-$src}
for c in "$src"/*.bpf.c; do
  o="$out/$(basename "${c%.c}").o"
  # The source path in BTF is made relative, so the bytes do not depend on the checkout's place.
  clang -O2 -g -target bpf -Wall -Werror -ffile-prefix-map="$PWD"=. -I/usr/include/"$(uname -m)"-linux-gnu -c "$c" -o "$o"
  llvm-strip -g "$o"
done
