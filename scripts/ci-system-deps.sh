#!/usr/bin/env bash
# Installs the system packages the test suite needs beyond Python: nftables (`nft`, for the
# one-way packet drops of the network-namespace test), iproute2 (`ip`, for namespaces, veth
# pairs and the bridge), etcd-server (`etcd`, the real 3-member cluster behind the etcd store
# backend's tests) and etcd-client (`etcdctl`, for debugging that cluster by hand).
# Idempotent: nothing is installed when every tool is already present.
# As root it uses apt-get (one `apt-get update`, then a minimal install); otherwise it exits
# non-zero naming the missing packages, since installing them needs root.
set -euo pipefail

# Tools live in /usr/sbin on Debian/Ubuntu, which a non-root PATH often lacks.
export PATH="$PATH:/usr/sbin:/sbin"

tools=(nft ip etcd etcdctl)
missing=()
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "ci-system-deps: ${tools[*]} already present; nothing to install"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ci-system-deps: missing system package(s): ${missing[*]}" >&2
    echo "ci-system-deps: run this script as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: missing system package(s): ${missing[*]}; apt-get is not available" >&2
    exit 1
fi

echo "ci-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# Installs all of them even if only some are missing: apt-get leaves an installed package alone.
apt-get install -y --no-install-recommends nftables iproute2 etcd-server etcd-client

# Debian's etcd-server enables an `etcd` system service on install; the tests start their own
# members on free ports, so a service left running would only hold port 2379 for nothing.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi

for tool in "${tools[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ci-system-deps: $tool is still missing after the install" >&2
        exit 1
    fi
done
echo "ci-system-deps: done"
