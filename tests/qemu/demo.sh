#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The demo (make run), inside the guest: a live ext4 file system on a virtio
# disk, a full backup, more writes, an incremental backup, and the proof that
# the backup equals the device at the second snapshot.
set -eu
DISK=
for d in /sys/block/vd*; do
	[ "$(cat "$d/serial" 2>/dev/null)" = blksnap-e ] && DISK=/dev/${d##*/}
done
say() { echo "demo: $*"; }
run() { echo "\$ $*"; "$@" 2>&1 | sed 's/^/demo: /'; }
MNT=$BLKSNAP_SCRATCH/mnt
OUT=$BLKSNAP_SCRATCH/backup
STORE=$BLKSNAP_SCRATCH

say "disk $DISK: $(($(cat /sys/class/block/${DISK#/dev/}/size) / 2048)) MiB"
run blksnapctl version
run blksnapctl attach "$DISK"
run mkfs.ext4 -q -F "$DISK"
mkdir -p "$MNT"
mount "$DISK" "$MNT"
say "a writer appends to $MNT/log while we back up"
( i=0; while :; do echo "line $i $(date +%s.%N)" >>"$MNT/log"; i=$((i + 1)); sleep 0.05; done ) &
WRITER=$!
dd if=/dev/urandom of="$MNT/big" bs=1M count=20 status=none
# A store of at most 256 MiB: the default, 1 GiB, would grow by 1 GiB at
# once on the guest's tmpfs, which holds the backups too.
run blksnapctl backup full "$DISK" --store "$STORE" --limit 256M --to "$OUT"
say "writing 3 MiB more"
dd if=/dev/urandom of="$MNT/more" bs=1M count=3 status=none
sync
echo "\$ blksnapctl backup incremental $DISK --store $STORE --limit 256M --to $OUT --keep-snapshot"
blksnapctl --json backup incremental "$DISK" --store "$STORE" --limit 256M --to "$OUT" --keep-snapshot >"$BLKSNAP_SCRATCH/report.json"
ID=$(jq -r .snapshot "$BLKSNAP_SCRATCH/report.json")
IMAGE=$(jq -r '.devices[0].image' "$BLKSNAP_SCRATCH/report.json")
READ=$(jq -r '.devices[0].copied.read' "$BLKSNAP_SCRATCH/report.json")
SIZE=$(jq -r '.devices[0].size' "$BLKSNAP_SCRATCH/report.json")
say "incremental: copied $((READ >> 10)) KiB of a $((SIZE >> 20)) MiB device ($(awk -v a="$READ" -v b="$SIZE" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
IMG_SUM=$(sha256sum "$IMAGE" | cut -d' ' -f1)
BAK=$OUT/${DISK#/dev/}.img
BAK_SUM=$(sha256sum "$BAK" | cut -d' ' -f1)
say "snapshot image $IMAGE sha256 $IMG_SUM"
say "backup image   $BAK sha256 $BAK_SUM"
run blksnapctl verify "$BAK" --manifest "$OUT/${DISK#/dev/}.manifest.json"
run blksnapctl snapshot destroy "$ID"
kill $WRITER
wait $WRITER 2>/dev/null || true
umount "$MNT"
run blksnapctl detach "$DISK"
if [ "$IMG_SUM" = "$BAK_SUM" ]; then
	say "OK: the incremental backup equals the device at the second snapshot"
else
	say "FAILED: the backup differs from the snapshot"
	exit 1
fi
