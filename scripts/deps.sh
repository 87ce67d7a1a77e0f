#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Installs what building and testing blk-snap needs, on Debian 12 as root,
# then checks that every tool the build, the tests and the demo call is
# there and runs. Installing one package can remove another (with a newer
# qemu-utils from backports, installing qemu-system-x86 removes it), and a
# tool that is gone would only show when a script calls it: what does not
# run is installed once more, and what still does not run stops here with
# one line naming it.
# Idempotent: with everything in place nothing is installed, and the checks
# run in parallel (well under a second).
set -euo pipefail

APT_PACKAGES=(
	clang-19 lld-19 llvm-19 libclang-19-dev
	linux-source-6.12
	qemu-system-x86 qemu-utils udev
	flex bison bc cpio kmod rsync python3 libelf-dev libssl-dev dwarves
	e2fsprogs xfsprogs util-linux fdisk fio dmsetup jq
	gcc-multilib make patch perl xz-utils
	dkms groff-base
	mmdebstrap initramfs-tools-core dracut-core shellcheck
	lvm2 cryptsetup-bin mdadm gdisk dosfstools postgresql sqlite3
)

# What the scripts, the tests (the guest runs the host's binaries) and the
# demo call, by the name a missing one is reported with.
TOOLS=(
	qemu-img qemu-nbd qemu-system-x86_64 vng
	clang ld.lld llvm-ar llvm-nm llvm-objcopy libclang bindgen
	rustc cargo rustfmt cargo-clippy rust-src
	python3 python3-ply-git
	fio dmsetup jq mkfs.ext4 fsck.ext4 debugfs mkfs.xfs xfs_repair
	losetup mount sfdisk udevadm kmod
	lvm cryptsetup mdadm sgdisk mkfs.vfat pg_ctl sqlite3
	dkms groff gcc-m32 make flex bison bc cpio rsync pahole patch perl xz
)

export PATH="$HOME/.cargo/bin:$PATH"
LLVM=/usr/lib/llvm-19/bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Succeeds when tool $1 is there and runs.
probe() {
	case $1 in
	clang | ld.lld | llvm-ar | llvm-nm | llvm-objcopy) "$LLVM/$1" --version ;;
	# bindgen loads libclang only for a header.
	libclang)
		printf 'int blksnap_probe;\n' >"$tmp/probe.h"
		bindgen "$tmp/probe.h" | grep -q blksnap_probe
		;;
	cargo-clippy) cargo clippy --version ;;
	rust-src) [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ] ;;
	# checkpatch.pl runs scripts/spdxcheck.py, which needs ply and git.
	python3-ply-git) python3 -c "import ply, git" ;;
	gcc-m32) printf 'int main(void) { return 0; }\n' |
		gcc -m32 -static -x c - -o "$tmp/probe32" ;;
	mkfs.ext4 | fsck.ext4 | debugfs | mkfs.xfs | xfs_repair) "$1" -V ;;
	perl) perl -e 1 ;;
	lvm) lvm version ;;
	mdadm | sgdisk) "$1" --version ;;
	mkfs.vfat) mkfs.vfat --help ;;
	# Debian keeps the server's programs out of PATH.
	pg_ctl) for p in /usr/lib/postgresql/*/bin/pg_ctl; do "$p" --version; done ;;
	sqlite3) sqlite3 -version ;;
	*) "$1" --version ;;
	esac </dev/null >/dev/null 2>&1
}

# Where tool $1 comes from: apt:PACKAGE, rustup:COMPONENT, cargo, pip:ARGS,
# or none: (with what to do).
source_of() {
	case $1 in
	qemu-img | qemu-nbd) echo apt:qemu-utils ;;
	qemu-system-x86_64) echo apt:qemu-system-x86 ;;
	clang) echo apt:clang-19 ;;
	ld.lld) echo apt:lld-19 ;;
	llvm-ar | llvm-nm | llvm-objcopy) echo apt:llvm-19 ;;
	libclang) echo apt:libclang-19-dev ;;
	mkfs.ext4 | fsck.ext4 | debugfs) echo apt:e2fsprogs ;;
	mkfs.xfs | xfs_repair) echo apt:xfsprogs ;;
	losetup) echo apt:util-linux ;;
	sfdisk) echo apt:fdisk ;;
	lvm) echo apt:lvm2 ;;
	cryptsetup) echo apt:cryptsetup-bin ;;
	sgdisk) echo apt:gdisk ;;
	mkfs.vfat) echo apt:dosfstools ;;
	pg_ctl) echo apt:postgresql ;;
	udevadm) echo apt:udev ;;
	groff) echo apt:groff-base ;;
	gcc-m32) echo apt:gcc-multilib ;;
	pahole) echo apt:dwarves ;;
	xz) echo apt:xz-utils ;;
	fio | dmsetup | jq | mount | kmod | dkms | make | flex | bison | bc | cpio | rsync | patch | perl | python3)
		echo "apt:$1" ;;
	rustfmt) echo rustup:rustfmt ;;
	cargo-clippy) echo rustup:clippy ;;
	rust-src) echo rustup:rust-src ;;
	bindgen) echo cargo ;;
	vng) echo pip:virtme-ng==1.42 ;;
	python3-ply-git) echo pip:ply GitPython ;;
	*) echo "none:install Rust with rustup (https://rustup.rs)" ;;
	esac
}

# Prints the tools that do not run, all probed at once.
not_working() {
	local t
	mkdir -p "$tmp/bad"
	rm -f "$tmp/bad/"*
	for t in "${TOOLS[@]}"; do
		(probe "$t" || : >"$tmp/bad/$t") &
	done
	wait
	for t in "${TOOLS[@]}"; do
		[ ! -e "$tmp/bad/$t" ] || echo "$t"
	done
}

apt_updated=
apt_install() {
	echo "deps: installing $*"
	if [ "$(id -u)" != 0 ]; then
		echo "deps: need root to install $*" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	# Another build may be running apt: wait for its lock.
	local lock=(-o DPkg::Lock::Timeout=600)
	if [ -z "$apt_updated" ]; then
		apt-get "${lock[@]}" update -qq
		apt_updated=1
	fi
	apt-get "${lock[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
}

# Installs the tools named, each from where it comes.
install_tools() {
	local t s apt=() pip=()
	for t; do
		s=$(source_of "$t")
		case $s in
		apt:*) apt+=("${s#apt:}") ;;
		rustup:*)
			echo "deps: rustup component add ${s#rustup:}"
			rustup component add "${s#rustup:}" || true
			;;
		cargo)
			echo "deps: cargo install bindgen-cli"
			cargo install --locked bindgen-cli --version 0.73.2 || true
			;;
		pip:*) pip+=("${s#pip:}") ;;
		esac
	done
	if ((${#apt[@]})); then
		mapfile -t apt < <(printf '%s\n' "${apt[@]}" | sort -u)
		apt_install "${apt[@]}" || true
	fi
	for s in "${pip[@]}"; do
		echo "deps: pip install $s"
		# shellcheck disable=SC2086 # ARGS are words
		python3 -m pip install --quiet $s || true
	done
}

# The packages, by their state in dpkg (one query).
missing=()
mapfile -t installed < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' \
	"${APT_PACKAGES[@]}" 2>/dev/null | awk '$1 == "ii" { print $2 }')
for p in "${APT_PACKAGES[@]}"; do
	[[ " ${installed[*]} " == *" $p "* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
	apt_install "${missing[@]}"
fi

if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
	echo "deps: rustc and cargo are missing: install Rust with rustup (https://rustup.rs)" >&2
	exit 1
fi

# Then every tool must run; what does not is installed once more (an
# install above may have removed it).
mapfile -t bad < <(not_working)
if ((${#bad[@]})); then
	echo "deps: not working: ${bad[*]}"
	install_tools "${bad[@]}"
	mapfile -t bad < <(not_working)
fi
if ((${#bad[@]})); then
	line=
	for t in "${bad[@]}"; do
		s=$(source_of "$t")
		line+="${line:+, }$t (${s/:/ })"
	done
	echo "deps: FAILED: does not run after installing: $line" >&2
	exit 1
fi
