#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# dkms-check.sh KDIR [KVER]: can the blksnap module be built against the
# kernel build tree KDIR (/lib/modules/KVER/build)? DKMS runs it before the
# build (dkms.conf); the module needs a 6.12 kernel with CONFIG_RUST and the
# blk_filter/ patch series. It checks:
#
#   - CONFIG_RUST=y in KDIR/.config;
#   - include/linux/blk-filter.h, added by the series, in KDIR or in the
#     source tree KDIR/source of an O= build;
#   - when KDIR has them (a built tree does), the series' exports in
#     Module.symvers (blkfilter_register) and its Rust abstraction in the
#     kernel crate's metadata rust/libkernel.rmeta (blkfilter_operations);
#   - that rustc and clang in PATH are the compilers the kernel was built
#     with (CONFIG_RUSTC_VERSION_TEXT, CONFIG_CC_VERSION_TEXT): a Rust module
#     must be built by the kernel's own rustc.
#
# Exits 0 with nothing printed when all hold; otherwise prints one line that
# says what the kernel lacks (and one about the compilers) and exits 1.
set -euo pipefail

KDIR=${1:?usage: dkms-check.sh KDIR [KVER]}
KVER=${2:-}
if [ -z "$KVER" ] && [ -f "$KDIR/include/config/kernel.release" ]; then
	KVER=$(cat "$KDIR/include/config/kernel.release")
fi
KVER=${KVER:-at $KDIR}
if [ ! -d "$KDIR" ]; then
	echo "blksnap: no build tree $KDIR for kernel $KVER (install its headers)" >&2
	exit 1
fi

config() { sed -n "s/^$1=\"\(.*\)\"$/\1/p" "$KDIR/.config" 2>/dev/null || true; }
missing=()
toolchain=()

rust=0
grep -qsx 'CONFIG_RUST=y' "$KDIR/.config" && rust=1
[ $rust = 1 ] || missing+=("CONFIG_RUST not set")
if [ ! -f "$KDIR/include/linux/blk-filter.h" ] &&
	[ ! -f "$KDIR/source/include/linux/blk-filter.h" ]; then
	missing+=("no include/linux/blk-filter.h")
fi
if [ -f "$KDIR/Module.symvers" ] &&
	! grep -q '[[:space:]]blkfilter_register[[:space:]]' "$KDIR/Module.symvers"; then
	missing+=("blkfilter_register not exported (Module.symvers)")
fi
if [ $rust = 1 ]; then
	if [ ! -f "$KDIR/rust/libkernel.rmeta" ]; then
		missing+=("no rust/libkernel.rmeta (the kernel crate is not built)")
	elif ! grep -qa blkfilter_operations "$KDIR/rust/libkernel.rmeta"; then
		missing+=("no block filter abstraction in rust/libkernel.rmeta")
	fi
	want=$(config CONFIG_RUSTC_VERSION_TEXT)
	have=$(rustc --version 2>/dev/null || echo "no rustc")
	[ -z "$want" ] || [ "$want" = "$have" ] ||
		toolchain+=("rustc: $have, the kernel's: $want")
fi
want=$(config CONFIG_CC_VERSION_TEXT)
case "$want" in
*clang*)
	have=$(clang --version 2>/dev/null | head -1 || true)
	[ "$want" = "$have" ] || toolchain+=("clang: ${have:-no clang}, the kernel's: $want")
	;;
esac

if ((${#missing[@]})); then
	reasons=$(printf '%s; ' "${missing[@]}")
	echo "blksnap: kernel $KVER lacks the blk-filter patch series or CONFIG_RUST (${reasons%; }); see README.md 'On your own kernel'" >&2
fi
if ((${#toolchain[@]})); then
	reasons=$(printf '%s; ' "${toolchain[@]}")
	echo "blksnap: kernel $KVER was built by other compilers than those in PATH (${reasons%; }); put the kernel's rustc and clang first in PATH" >&2
fi
((${#missing[@]} + ${#toolchain[@]} == 0))
