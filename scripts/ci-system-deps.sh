#!/usr/bin/env bash
# Installs the system packages the test suite needs beyond Python: nftables (`nft`, for the
# one-way packet drops of the network-namespace test) and iproute2 (`ip`, for namespaces, veth
# pairs and the bridge). Idempotent: nothing is installed when both tools are already present.
# As root it uses apt-get (one `apt-get update`, then a minimal install); otherwise it exits
# non-zero naming the missing packages, since installing them needs root.
set -euo pipefail

# Tools live in /usr/sbin on Debian/Ubuntu, which a non-root PATH often lacks.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "ci-system-deps: nft and ip already present; nothing to install"
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
# Installs both even if only one is missing: apt-get leaves an installed package alone.
apt-get install -y --no-install-recommends nftables iproute2

for tool in nft ip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ci-system-deps: $tool is still missing after the install" >&2
        exit 1
    fi
done
echo "ci-system-deps: done"
