#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The demo (make run), inside the guest: track changes on a virtio disk while
# a file system is created and written, then show what changed.
set -eu
DISK=
for d in /sys/block/vd*; do
	[ "$(cat "$d/serial" 2>/dev/null)" = blksnap-a ] && DISK=/dev/${d##*/}
done
say() { echo "demo: $*"; }
run() { echo "\$ $*"; "$@" 2>&1 | sed 's/^/demo: /'; }

say "disk $DISK: $(($(cat /sys/class/block/${DISK#/dev/}/size) / 2048)) MiB"
run blksnapctl version
run blksnapctl attach "$DISK"
run blksnapctl cbt info "$DISK"
say "writing 1 MiB at 64 MiB and 4 KiB at the last 4 KiB of the disk"
run dd if=/dev/urandom of="$DISK" bs=1M count=1 seek=64 oflag=direct status=none
run dd if=/dev/urandom of="$DISK" bs=4k count=1 seek=$((256 * 256 - 1)) oflag=direct status=none
run blksnapctl cbt read --active "$DISK"
say "creating an ext4 file system and writing a 3 MiB file"
run mkfs.ext4 -q -F "$DISK"
MNT=$BLKSNAP_SCRATCH/mnt
mkdir -p "$MNT"
mount "$DISK" "$MNT"
dd if=/dev/urandom of="$MNT/file" bs=1M count=3 status=none
umount "$MNT"
run blksnapctl cbt read --active "$DISK"
run blksnapctl detach "$DISK"
