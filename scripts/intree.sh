#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Builds the module the in-tree way (the Kconfig path of README.md "On your
# own kernel") against the cached kernel of scripts/kernel.sh:
#
#   - the repository's module goes to drivers/block/blk-snap (Kconfig, Kbuild
#     and blk_snap/), drivers/block/Kconfig gets
#     `source "drivers/block/blk-snap/Kconfig"` before its last line and
#     drivers/block/Makefile `obj-$(CONFIG_BLK_SNAP) += blk-snap/`;
#   - CONFIG_BLK_SNAP=m is set with scripts/config, then olddefconfig, which
#     must keep it (its dependencies hold);
#   - make drivers/block/blk-snap/blk_snap/blksnap.ko builds the module, and
#     modinfo must show an in-tree blksnap of the kernel's release.
#
# The cached source tree and build directory are not touched: in a mount
# namespace of its own, each is covered by an overlay whose upper layer is a
# scratch directory under /tmp, at the same path, so every recorded command
# line stays the same and only the new directory is compiled (a copy of the
# tree at another path would change them all and rebuild the kernel). The
# scratch directory goes away at the end. Needs root, or unprivileged user
# namespaces with overlayfs in them.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
export PATH="/usr/lib/llvm-19/bin:$HOME/.cargo/bin:$PATH"
JOBS=${JOBS:-$(nproc)}

if [ "${1:-}" != --inside ]; then
	KOUT=$(cat "$CACHE/kbuild-output")
	[ -f "$KOUT/.config" ] || {
		echo "intree: no kernel build in $KOUT (run make kernel)" >&2
		exit 1
	}
	# The lock of scripts/kernel.sh: the layers below must not change.
	exec 9>"$CACHE/.lock"
	flock 9
	work=$(mktemp -d /tmp/blksnap-intree.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	if [ "$(id -u)" = 0 ]; then
		ns=(unshare --mount --propagation private)
	else
		ns=(unshare --user --map-root-user --mount --propagation private)
	fi
	start=$(date +%s)
	"${ns[@]}" "$0" --inside "$work" "$KOUT"
	echo "intree: in-tree build passed in $(($(date +%s) - start)) s"
	exit 0
fi

work=$2
KOUT=$3
SRC=$(readlink -f "$KOUT/source")
overlay() {
	mkdir -p "$work/$2.upper" "$work/$2.work"
	mount -t overlay overlay \
		-o "lowerdir=$1,upperdir=$work/$2.upper,workdir=$work/$2.work" "$1"
}
overlay "$SRC" src
overlay "$KOUT" build

# The tree, as README.md "On your own kernel" says to set it up.
dst=$SRC/drivers/block/blk-snap
mkdir -p "$dst/blk_snap/logic"
cp "$REPO/Kconfig" "$REPO/Kbuild" "$dst/"
cp "$REPO"/blk_snap/Kbuild "$REPO"/blk_snap/*.rs "$dst/blk_snap/"
cp "$REPO"/blk_snap/logic/*.rs "$dst/blk_snap/logic/"
kconfig=$SRC/drivers/block/Kconfig
grep -q '^endif # BLK_DEV$' "$kconfig" || {
	echo "intree: drivers/block/Kconfig does not end the BLK_DEV block as expected" >&2
	exit 1
}
sed -i 's|^endif # BLK_DEV$|source "drivers/block/blk-snap/Kconfig"\n\n&|' "$kconfig"
# shellcheck disable=SC2016 # a make variable
echo 'obj-$(CONFIG_BLK_SNAP) += blk-snap/' >>"$SRC/drivers/block/Makefile"

kmake() { make -C "$SRC" O="$KOUT" LLVM=1 "$@"; }
"$SRC/scripts/config" --file "$KOUT/.config" --module BLK_SNAP
kmake -s olddefconfig
grep -qx 'CONFIG_BLK_SNAP=m' "$KOUT/.config" || {
	echo "intree: olddefconfig dropped CONFIG_BLK_SNAP=m: $(grep BLK_SNAP "$KOUT/.config" || echo unset)" >&2
	exit 1
}
log=$work/build.log
ko=drivers/block/blk-snap/blk_snap/blksnap.ko
if ! kmake -j"$JOBS" "$ko" >"$log" 2>&1; then
	tail -40 "$log" >&2
	echo "intree: in-tree build of $ko failed" >&2
	exit 1
fi
grep -E '^ *(RUSTC|CC|LD|AR|MODPOST)' "$log" | sed 's/^/intree:   /'
grep -E '^ *(RUSTC|CC|LD|AR)' "$log" | grep -v blk-snap && {
	echo "intree: the build compiled more than the module (see above)" >&2
	exit 1
}
release=$(cat "$KOUT/include/config/kernel.release")
name=$(modinfo -F name "$KOUT/$ko")
intree=$(modinfo -F intree "$KOUT/$ko")
vermagic=$(modinfo -F vermagic "$KOUT/$ko")
echo "intree: $ko: name $name, intree $intree, vermagic $vermagic"
if [ "$name" != blksnap ] || [ "$intree" != Y ] || [ "${vermagic%% *}" != "$release" ]; then
	echo "intree: $ko is not an in-tree blksnap for $release" >&2
	exit 1
fi
