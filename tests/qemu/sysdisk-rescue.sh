#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The bare-metal restore of the live system disk test (run.sh sysdisk):
# runs in the rescue boot, the 9p test guest (the host's tools, the test
# kernel) with the backup disk of the live system's boot (serial
# sysdisk-backup, ext4, the restore points and the take's listings) and two
# blank disks: sysdisk-restore-a, of the system disk's size, and
# sysdisk-restore-b, 1.5 times larger. Nothing of the module is needed: a
# restore reads the qcow2 chain and writes the device.
#
# For each blank disk: `blksnapctl restore` of the last point (the whole
# disk: GPT, GRUB's core in the BIOS boot partition, /boot, the LVM PV
# with its metadata and both LVs); on the larger disk `sgdisk -e` then
# moves the GPT's backup header to the disk's new end (the partitions stay
# as they were; the space after them is free for a new partition or
# pvresize). Then, before anything mounts them read-write: the partitions
# and the VG as the restore wrote them (LVM given this disk alone,
# --devices: the other restored disk has the same VG and UUIDs), e2fsck -fn
# of / and /boot, xfs_repair -n of /var, and the files against the take's
# listing (every file's sha256, and the tree: type, mode, owner, size,
# mtime, link target).
#
# usage: sysdisk-rescue.sh RESULTS REPO
set -u
RESULTS=$1 REPO=$2
export PATH=$REPO/target/release:$PATH
T0=$(date +%s.%N)
ok() { echo "ok sysdisk_rescue_$1"; }
fail() { echo "FAIL sysdisk_rescue_$1: $2"; }
now() { date +%s.%N; }
since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
step() { echo "    $(since "$T0") s: $1"; }
indent() { sed 's/^/      /'; }
disk() { readlink -f "/dev/disk/by-id/virtio-$1"; }

echo "guest: rescue boot, $(uname -r), $(nproc) CPUs"
udevadm settle 2>/dev/null
B=/run/rescue/backup
M=/run/rescue/mnt
mkdir -p $B $M/root $M/boot $M/var
BACKUP=$(disk sysdisk-backup)
# Read-only: the points are only read.
if ! mount -o ro "$BACKUP" $B; then
	fail backup_disk "cannot mount $BACKUP"
	echo "guest-exit 1"
	exit 1
fi
POINTS=$B/points
n=$(find $B/lists -name 'take-*.sha256' | sed 's/.*take-\(.*\)\.sha256/\1/' | sort -n | tail -1)
echo "    \$ blksnapctl backup list $POINTS"
blksnapctl backup list $POINTS 2>&1 | indent
# LVM on this one partition only, without udev.
LVMCONF='activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 } backup { backup = 0 archive = 0 }'

check_disk() { # tag target
	local tag=$1 tgt=$2 pv out t0 rc=0
	blockdev --rereadpt "$tgt"
	udevadm settle 2>/dev/null
	pv=${tgt}3
	echo "    \$ sgdisk -p $tgt"
	sgdisk -p "$tgt" 2>&1 | tail -4 | indent
	echo "    sgdisk -v: $(sgdisk -v "$tgt" 2>&1 | grep -E 'problems|Problem' | head -2 | tr '\n' ' ')"
	if ! out=$(lvm vgchange --config "$LVMCONF" --devices "$pv" -ay sysvg 2>&1); then
		fail "${tag}_lvm" "vgchange -ay: $out"
		return 1
	fi
	echo "    \$ lvs --devices $pv"
	lvm lvs --config "$LVMCONF" --devices "$pv" -o lv_name,lv_size,seg_pe_ranges 2>&1 | indent
	t0=$(now)
	for dev in /dev/mapper/sysvg-root "${tgt}2"; do
		if out=$(e2fsck -fn "$dev" 2>&1); then
			echo "    e2fsck -fn $dev: $(tail -1 <<<"$out")"
		else
			rc=1
			fail "${tag}_fsck_clean" "e2fsck -fn $dev: $(tail -3 <<<"$out" | tr '\n' ' ')"
		fi
	done
	# A frozen XFS has its log covered (every change written in place),
	# not closed by an unmount record: the first mount replays that
	# covered log, a no-op, as the restored system's first boot would;
	# then xfs_repair -n must find nothing.
	if ! out=$(mount /dev/mapper/sysvg-var $M/var 2>&1 && umount $M/var 2>&1); then
		rc=1
		fail "${tag}_fsck_clean" "the first mount of /var: $out"
	fi
	if out=$(xfs_repair -n /dev/mapper/sysvg-var 2>&1); then
		echo "    xfs_repair -n /dev/mapper/sysvg-var (after a mount replayed its covered log): exit 0, no error"
	else
		rc=1
		fail "${tag}_fsck_clean" "xfs_repair -n: $(tail -3 <<<"$out" | tr '\n' ' ')"
	fi
	[ $rc = 0 ] && ok "${tag}_fsck_clean"
	step "$tag: file systems checked in $(since "$t0") s"
	t0=$(now)
	if mount -o ro /dev/mapper/sysvg-root $M/root && mount -o ro "${tgt}2" $M/boot &&
		mount -o ro /dev/mapper/sysvg-var $M/var; then
		if out=$(cd $M && sha256sum -c --quiet "$B/lists/take-$n.sha256" 2>&1); then
			ok "${tag}_files_identical_to_the_take"
			echo "    all $(wc -l <"$B/lists/take-$n.sha256") files of point $n's take identical (sha256)"
		else
			fail "${tag}_files_identical_to_the_take" "$(head -3 <<<"$out" | tr '\n' ' ')"
		fi
		if out=$(cd $M && find root boot var -xdev -printf '%y %m %U:%G %s %T@ %p -> %l\n' | sort |
			diff "$B/lists/take-$n.tree" - 2>&1); then
			ok "${tag}_tree_identical_to_the_take"
			echo "    the tree ($(wc -l <"$B/lists/take-$n.tree") entries: type, mode, owner, size, mtime, link) identical"
		else
			fail "${tag}_tree_identical_to_the_take" "$(head -4 <<<"$out" | tr '\n' ' ')"
		fi
	else
		fail "${tag}_files_identical_to_the_take" "cannot mount the restored file systems"
	fi
	umount $M/root $M/boot $M/var 2>/dev/null
	lvm vgchange --config "$LVMCONF" --devices "$pv" -an sysvg >/dev/null 2>&1
	step "$tag: files checked in $(since "$t0") s"
}

for tag in same big; do
	case $tag in
	same) tgt=$(disk sysdisk-restore-a) ;;
	big) tgt=$(disk sysdisk-restore-b) ;;
	esac
	echo "    target $tgt: $(blockdev --getsize64 "$tgt") bytes, blank"
	echo "    \$ blksnapctl restore --point $n $POINTS $tgt --device vda"
	t0=$(now)
	out=$(blksnapctl restore --point "$n" $POINTS "$tgt" --device vda 2>&1)
	rc=$?
	secs=$(since "$t0")
	echo "$out" | indent
	echo "      [exit $rc, $secs s]"
	echo "$secs" >"$RESULTS/restore-$tag.time"
	if [ $rc = 0 ]; then ok "${tag}_restored"; else fail "${tag}_restored" "exit $rc"; fi
	if [ $tag = big ]; then
		# The backup GPT header is at the old disk's end: moved to the
		# new end (what sgdisk -v and the kernel's partition scan want).
		echo "    \$ sgdisk -e $tgt"
		sgdisk -e "$tgt" 2>&1 | indent
	fi
	check_disk "$tag" "$tgt"
done
umount $B
echo "guest-exit 0"
