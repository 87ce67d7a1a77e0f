#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Installs what building and testing blk-snap needs, on Debian 12 as root.
# Idempotent: only missing pieces are installed.
set -euo pipefail

APT_PACKAGES=(
	clang-19 lld-19 llvm-19 libclang-19-dev
	linux-source-6.12
	qemu-system-x86 qemu-utils udev
	flex bison bc cpio kmod rsync python3 libelf-dev libssl-dev dwarves
	e2fsprogs xfsprogs util-linux fdisk fio
	gcc-multilib
	dkms groff-base
	mmdebstrap initramfs-tools-core dracut-core shellcheck
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}"
	if [ "$(id -u)" != 0 ]; then
		echo "deps: need root to install packages" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
	echo "deps: cargo (rustup) is required" >&2
	exit 1
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
	echo "deps: rustup component add rust-src"
	rustup component add rust-src
fi
if ! command -v bindgen >/dev/null; then
	echo "deps: cargo install bindgen-cli"
	cargo install --locked bindgen-cli --version 0.73.2
fi
if ! command -v vng >/dev/null; then
	echo "deps: pip install virtme-ng"
	python3 -m pip install --quiet virtme-ng==1.42
fi
# checkpatch.pl runs scripts/spdxcheck.py, which needs ply.
if ! python3 -c "import ply, git" 2>/dev/null; then
	python3 -m pip install --quiet ply GitPython
fi
