#!/bin/bash
# Installs what sdccache needs to build, test and benchmark on Debian 12
# (as root).  Only missing packages are installed; safe to run again.
set -euo pipefail

packages=(
  # build
  g++ meson ninja-build pkg-config nbdkit nbdkit-plugin-dev libnbd-dev perl
  # tests and tools
  libgtest-dev libbenchmark-dev python3-libnbd libnbd-bin qemu-utils fio
  fuse3 fuse2fs e2fsprogs socat
  # sanitizers, fuzzing, -Wthread-safety
  clang-14 libclang-rt-14-dev
)
if [ "${1:-}" = "--bench" ]; then packages+=(python3-matplotlib); fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "deps: all present"
