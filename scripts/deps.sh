#!/bin/sh
# Installs the Debian 12 packages moongate builds, tests and benchmarks with, and only those
# that are missing. Idempotent: a second run installs nothing and says so.
#   scripts/deps.sh          build + test packages
#   scripts/deps.sh bench    also nginx (with Lua and lua-cjson), haproxy and wrk for `make bench`
set -eu

PKGS="build-essential pkg-config clang libuv1-dev libluajit2-5.1-dev node-llhttp libyajl-dev
libssl-dev libhiredis-dev python3 python3-pytest curl procps"
if [ "${1:-}" = bench ]; then
  PKGS="$PKGS nginx-light libnginx-mod-http-lua lua-cjson haproxy wrk util-linux"
fi

missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done

if [ -z "$missing" ]; then
  echo "deps: all packages present"
  exit 0
fi

echo "deps: installing missing Debian packages:$missing"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || echo "deps: apt-get update failed; trying with the current lists"
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
