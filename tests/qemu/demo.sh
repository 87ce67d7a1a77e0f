#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The demo (make run), inside the guest: a live ext4 file system on a virtio
# disk, a full backup, more writes, an incremental backup (restore points 1
# and 2, qcow2), the list of points, a verify, and two restores: point 2 to a
# raw file equal to the device at the second snapshot, and point 1 back
# onto the disk itself.
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
BIG_SUM=$(sha256sum "$MNT/big" | cut -d' ' -f1)
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
POINT=$(jq -r '.devices[0].point' "$BLKSNAP_SCRATCH/report.json")
say "incremental: restore point $POINT, copied $((READ >> 10)) KiB of a $((SIZE >> 20)) MiB device ($(awk -v a="$READ" -v b="$SIZE" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
IMG_SUM=$(sha256sum "$IMAGE" | cut -d' ' -f1)
say "snapshot image $IMAGE sha256 $IMG_SUM"
run blksnapctl snapshot destroy "$ID"
run blksnapctl backup list "$OUT"
run blksnapctl verify "$OUT"
run qemu-img info --backing-chain "$OUT/${DISK#/dev/}/point-0002.qcow2"
# Point 2 to a raw file: the device at the second snapshot.
run blksnapctl restore --point 2 "$OUT" "$BLKSNAP_SCRATCH/restored.raw"
RAW_SUM=$(sha256sum "$BLKSNAP_SCRATCH/restored.raw" | cut -d' ' -f1)
say "restored point 2 sha256 $RAW_SUM"
rm -f "$BLKSNAP_SCRATCH/restored.raw"
kill $WRITER
wait $WRITER 2>/dev/null || true
umount "$MNT"
run blksnapctl detach "$DISK"
# Point 1 back onto the disk itself: the file written after it is gone.
run blksnapctl restore --point 1 "$OUT" "$DISK"
mount -o ro "$DISK" "$MNT"
run ls "$MNT"
BACK_SUM=$(sha256sum "$MNT/big" | cut -d' ' -f1)
HAS_MORE=no
[ -e "$MNT/more" ] && HAS_MORE=yes
umount "$MNT"
rc=0
if [ "$IMG_SUM" = "$RAW_SUM" ]; then
	say "OK: restore point 2 equals the device at the second snapshot"
else
	say "FAILED: restore point 2 differs from the snapshot"
	rc=1
fi
if [ "$BACK_SUM" = "$BIG_SUM" ] && [ $HAS_MORE = no ]; then
	say "OK: after restoring point 1 onto $DISK, big is as it was and more (written later) is gone"
else
	say "FAILED: the disk after restoring point 1: big $BACK_SUM (want $BIG_SUM), more present: $HAS_MORE"
	rc=1
fi
exit $rc
