#!/usr/bin/env bash
# Build the l4lb Debian package with dpkg-deb (part of dpkg, so on every Debian host and CI
# machine already; cargo-deb would be one more tool to compile there).
#
#   scripts/deb.sh [--binary PATH] [--out DIR]
#
# Without --binary it builds `cargo build --release --locked` first. Prints the .deb's path.
# Contents:
#   /usr/bin/l4lb
#   /lib/systemd/system/l4lb-agent.service, l4lb-controller.service
#   /etc/default/l4lb-agent, l4lb-controller            (conffiles: kept on upgrade)
#   /usr/share/l4lb/grafana/l4lb.json, prometheus/l4lb-rules.yml
#   /usr/share/doc/l4lb/README.md, docs/, copyright
# Install: dpkg -i l4lb_<version>_<arch>.deb; edit /etc/default/l4lb-agent;
#          systemctl enable --now l4lb-agent
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
out="target/deb"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 64 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release --locked >&2
  binary=target/release/l4lb
fi
[ -x "$binary" ] || { echo "no executable at $binary" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
mkdir -p "$out"
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"

install -D -m 0755 "$binary" "$root/usr/bin/l4lb"
# As Debian ships binaries: stripped (the debug info stays in target/ for profiling).
strip --strip-debug "$root/usr/bin/l4lb"
for u in l4lb-agent l4lb-controller; do
  install -D -m 0644 "deploy/systemd/$u.service" "$root/lib/systemd/system/$u.service"
  install -D -m 0644 "deploy/default/$u" "$root/etc/default/$u"
done
install -D -m 0644 deploy/grafana/l4lb.json "$root/usr/share/l4lb/grafana/l4lb.json"
install -D -m 0644 deploy/prometheus/l4lb-rules.yml "$root/usr/share/l4lb/prometheus/l4lb-rules.yml"
install -D -m 0644 README.md "$root/usr/share/doc/l4lb/README.md"
# The pages the README links to, beside it, so its relative links hold.
for page in docs/*; do
  install -D -m 0644 "$page" "$root/usr/share/doc/l4lb/$page"
done
cat > "$root/usr/share/doc/l4lb/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: l4lb

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

mkdir -p "$root/DEBIAN"
printf '/etc/default/l4lb-agent\n/etc/default/l4lb-controller\n' > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: l4lb
Version: $version
Architecture: $arch
Maintainer: l4lb developers <l4lb@localhost>
Installed-Size: $size
Depends: libc6
Section: net
Priority: optional
Description: Layer-4 virtual-IP load balancer for Marathon clusters
 l4lb gives every Marathon service a stable virtual IP answered on every host, in the
 style of DC/OS's minuteman: a controller builds the VIP table from Marathon, an agent
 on each host installs the addresses, forwards TCP and UDP to healthy tasks and answers
 DNS. Ships systemd units (l4lb-agent, l4lb-controller), their /etc/default files, a
 Grafana dashboard and Prometheus alert rules (/usr/share/l4lb).
EOF

deb="$out/l4lb_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >&2
echo "$deb"
