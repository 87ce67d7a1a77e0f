#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Builds a kernel: the Debian linux-source-6.12 tree with the blk_filter/
# patch series applied, configured from tinyconfig plus
# tests/qemu/kernel.config and the flavour's fragment:
#
#   kernel.sh          the debug test kernel (tests/qemu/kernel-debug.config)
#   kernel.sh bench    the benchmark's kernel (tests/qemu/kernel-bench.config)
#
# The two share the patched source tree and build in directories of their own.
#
# Everything lives outside the repository, in $BLKSNAP_CACHE (default
# ~/.cache/blk-snap). The build is keyed by a hash of the patches, the config
# fragment, the source version and the toolchain: with the same key nothing is
# rebuilt; with another key the patch series is swapped in place, so make
# only rebuilds what the changed files affect.
#
# Prints the build directory (KBUILD_OUTPUT) on the last line and stores it
# in $BLKSNAP_CACHE/kbuild-output (bench: kbuild-output-bench).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
FLAVOUR=${1:-debug}
case $FLAVOUR in
debug) SUFFIX= ;;
bench) SUFFIX=-bench ;;
*)
	echo "usage: kernel.sh [debug|bench]" >&2
	exit 2
	;;
esac
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
export PATH="/usr/lib/llvm-19/bin:$HOME/.cargo/bin:$PATH"
TARBALL=/usr/src/linux-source-6.12.tar.xz
DEBVER=$(dpkg-query -W -f='${Version}' linux-source-6.12)
SRC=$CACHE/linux-$DEBVER
OUT=$CACHE/build$SUFFIX-$DEBVER
FRAGMENTS=("$REPO/tests/qemu/kernel.config" "$REPO/tests/qemu/kernel-$FLAVOUR.config")
SERIES=$REPO/blk_filter/series
JOBS=${JOBS:-$(nproc)}

mkdir -p "$CACHE"
# One build at a time: the flavours share the patched source tree.
exec 9>"$CACHE/.lock"
flock 9
mapfile -t PATCHES < <(grep -v '^#' "$SERIES" | grep -v '^$' | sed "s|^|$REPO/blk_filter/|")

key=$( {
	echo "$DEBVER"
	cat "${FRAGMENTS[@]}" "${PATCHES[@]}" "$0"
	rustc --version; clang --version | head -1; bindgen --version
} | sha256sum | cut -d' ' -f1)

finish() {
	echo "$OUT" >"$CACHE/kbuild-output$SUFFIX"
	echo "$OUT"
}

if [ -f "$OUT/.blksnap-key" ] && [ "$(cat "$OUT/.blksnap-key")" = "$key" ] &&
	[ -f "$OUT/arch/x86/boot/bzImage" ]; then
	echo "kernel: $FLAVOUR up to date (key ${key:0:12}) in $OUT" >&2
	finish
	exit 0
fi

PRISTINE=$CACHE/linux-$DEBVER.orig
if [ ! -f "$PRISTINE/.blksnap-extracted" ]; then
	echo "kernel: extracting $TARBALL ($DEBVER)" >&2
	rm -rf "$PRISTINE" "$SRC" "$CACHE/linux-source-6.12"
	tar -C "$CACHE" -xf "$TARBALL"
	mv "$CACHE/linux-source-6.12" "$PRISTINE"
	touch "$PRISTINE/.blksnap-extracted"
fi
if [ ! -f "$SRC/.blksnap-copied" ]; then
	rm -rf "$SRC"
	cp -a "$PRISTINE" "$SRC"
	touch "$SRC/.blksnap-copied"
fi

# Bring the tree to pristine + the current series, touching only the files
# whose content changes, so that make rebuilds no more than needed.
files_of() {
	grep -hE '^(\+\+\+ b/|--- a/)' "$@" 2>/dev/null | sed -E 's#^(\+\+\+ b/|--- a/)##' | sort -u
}
APPLIED=$SRC/.blksnap-applied
mkdir -p "$APPLIED"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mapfile -t touched < <(files_of "${PATCHES[@]}" "$APPLIED"/*.patch)
for f in "${touched[@]}"; do
	if [ -f "$PRISTINE/$f" ]; then
		mkdir -p "$stage/$(dirname "$f")"
		cp "$PRISTINE/$f" "$stage/$f"
	fi
done
for p in "${PATCHES[@]}"; do
	patch -d "$stage" -p1 -s --no-backup-if-mismatch --forward <"$p" || {
		echo "kernel: $(basename "$p") does not apply to $DEBVER" >&2
		exit 1
	}
done
changed=0
for f in "${touched[@]}"; do
	if [ -f "$stage/$f" ]; then
		if ! cmp -s "$stage/$f" "$SRC/$f"; then
			mkdir -p "$SRC/$(dirname "$f")"
			cp "$stage/$f" "$SRC/$f"
			changed=$((changed + 1))
		fi
	elif [ -e "$SRC/$f" ]; then
		rm -f "$SRC/$f"
		changed=$((changed + 1))
	fi
done
rm -f "$APPLIED"/*.patch
cp "${PATCHES[@]}" "$APPLIED/"
echo "kernel: ${#PATCHES[@]} patches, $changed files changed in the tree" >&2

# The UAPI header in the kernel must be the one user space builds against.
cmp "$SRC/include/uapi/linux/blk-filter.h" "$REPO/include/uapi/linux/blk-filter.h" || {
	echo "kernel: include/uapi/linux/blk-filter.h differs from the patch series" >&2
	exit 1
}

# Configure in a scratch directory; install the .config only if it changed,
# so that an unchanged configuration triggers no rebuild.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$stage"' EXIT
make -s -C "$SRC" O="$tmp" LLVM=1 tinyconfig >/dev/null
"$SRC/scripts/kconfig/merge_config.sh" -m -O "$tmp" "$tmp/.config" "${FRAGMENTS[@]}" >/dev/null
make -s -C "$SRC" O="$tmp" LLVM=1 olddefconfig >/dev/null
bad=0
while IFS= read -r line; do
	case "$line" in '#'* | '') continue ;; esac
	opt=${line%%=*}
	if [ "${line#*=}" = n ]; then
		if grep -q "^$opt=" "$tmp/.config"; then
			echo "kernel: config wants $line, got $(grep "^$opt=" "$tmp/.config")" >&2
			bad=1
		fi
	elif ! grep -qxF "$line" "$tmp/.config"; then
		echo "kernel: config wants $line, got $(grep "^$opt=" "$tmp/.config" || echo unset)" >&2
		bad=1
	fi
done < <(cat "${FRAGMENTS[@]}")
[ $bad = 0 ] || exit 1
mkdir -p "$OUT"
cmp -s "$tmp/.config" "$OUT/.config" || cp "$tmp/.config" "$OUT/.config"

echo "kernel: building the $FLAVOUR kernel in $OUT with $JOBS jobs" >&2
start=$(date +%s)
make -s -C "$SRC" O="$OUT" LLVM=1 -j"$JOBS" olddefconfig >/dev/null
if ! make -C "$SRC" O="$OUT" LLVM=1 -j"$JOBS" bzImage modules >"$OUT/build.log" 2>&1; then
	grep -E -B2 -A10 'error|Error' "$OUT/build.log" | tail -60 >&2
	echo "kernel: build failed, see $OUT/build.log" >&2
	exit 1
fi
echo "kernel: built in $(($(date +%s) - start)) s" >&2
echo "$key" >"$OUT/.blksnap-key"
finish
