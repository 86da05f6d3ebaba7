#!/bin/sh
# check-cuda12.sh [DIR] — builds lathe with CUDA 12 (Colab's major version), for sm_75..sm_90 + PTX.
#
# This machine has CUDA 13 only. Debian 13 (trixie) ships nvidia-cuda-toolkit 12.4 in non-free,
# so this script makes a trixie chroot in DIR (default /srv/trixie) with debootstrap, installs
# that toolkit and lathe's build dependencies there, and runs configure --with-cuda=/usr and make
# (the kernel, and the GPU test and bench programs) on a clone of this repository. It compiles
# and links; it runs nothing on a GPU. Needs root, debootstrap and Debian's mirror; a few GB of
# disk; about ten minutes. Not part of `./quickstart check` (too heavy for every CI run).
set -eu
dir=${1:-/srv/trixie}
src=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$dir/bin/sh" ] || debootstrap --variant=minbase --components=main,contrib,non-free \
    trixie "$dir" http://deb.debian.org/debian
echo "deb http://deb.debian.org/debian trixie main contrib non-free non-free-firmware" \
    > "$dir/etc/apt/sources.list"
mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
chroot "$dir" /bin/sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install \
    -y -q --no-install-recommends nvidia-cuda-toolkit nvidia-cuda-dev g++ make autoconf \
    automake libtool pkg-config libzmq3-dev libjansson-dev libsodium-dev libsentencepiece-dev \
    libprotobuf-dev libopenblas-dev git ca-certificates python3" > "$dir/root/apt.log"
rm -rf "$dir/root/lathe"
git clone -q "$src" "$dir/root/lathe"
chroot "$dir" /bin/sh -c "nvcc --version | tail -1 && cd /root/lathe && autoreconf -fi \
    > /dev/null 2>&1 && ./configure -q --with-cuda=/usr && make -j2 lathe tests/gpu/test_ops \
    tests/gpu/test_model bench/bench_train && echo 'machine code:' \
    \$(cuobjdump --list-elf lathe | grep -o 'sm_[0-9]*' | sort -u) 'PTX:' \
    \$(cuobjdump --list-ptx lathe | grep -o 'sm_[0-9]*' | sort -u)"
echo "check-cuda12: built with CUDA 12"
