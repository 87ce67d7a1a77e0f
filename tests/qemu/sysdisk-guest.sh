#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The guest side of the live system disk test (run.sh sysdisk): runs in the
# system of sysdisk-image.sh, from its unit blksnap-sysdisk-test.service,
# once the system is up; the unit powers the machine off when it ends.
# run.sh puts this file on the disk mounted at /backup (serial
# sysdisk-backup). Which boot this is follows from the system disk's QEMU
# serial:
#
#   sysdisk           the live system (phase backup): with a writer
#                     appending to a log on /var all along, `blksnapctl
#                     backup full` of the whole running system disk (GPT,
#                     /boot, the LVM PV with root and /var) into restore
#                     points on /backup; the file listing at the take (see
#                     take_listing); a day-like workload on /, /var; then
#                     `backup incremental` and its listing.
#   sysdisk-restored, sysdisk-restored-big   a disk the rescue boot restored
#                     the last point onto (of the same size; 1.5 times
#                     larger): booted by SeaBIOS and GRUB from the disk;
#   sysdisk-instant   the point's qcow2 chain under a throwaway overlay,
#                     booted without a restore.
#                     In these three (phases restored, restored_big,
#                     instant): the system came up
#                     from the disk as the snapshot held it: root on LVM,
#                     /var, /boot, GRUB's command line; the files of the
#                     take's listing identical; /boot's e2fsck -fn clean.
#
# Prints `ok NAME` / `FAIL NAME: reason` lines on the console (NAME prefixed
# with sysdisk_PHASE_), transcript lines indented, then "sysdisk-guest:
# SERIAL done".
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

B=/backup
POINTS=$B/points
LISTS=$B/lists
T0=$(date +%s.%N)
SERIAL=
for s in sysdisk sysdisk-restored sysdisk-restored-big sysdisk-instant; do
	[ -e /dev/disk/by-id/virtio-$s ] && SERIAL=$s
done
case $SERIAL in
sysdisk) PHASE=backup ;;
sysdisk-restored) PHASE=restored ;;
sysdisk-restored-big) PHASE=restored_big ;;
sysdisk-instant) PHASE=instant ;;
*) PHASE=unknown ;;
esac
DISK=$(readlink -f /dev/disk/by-id/virtio-$SERIAL)
NAME=${DISK##*/}

ok() { echo "ok sysdisk_${PHASE}_$1"; }
fail() { echo "FAIL sysdisk_${PHASE}_$1: $2"; }
# The seconds since this script started, to one decimal.
elapsed() { awk -v t0="$T0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
now() { date +%s.%N; }
since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
step() { echo "    $(elapsed) s: $1"; }
indent() { sed 's/^/      /'; }
# Sectors written to the system disk since boot (/sys/block/X/stat).
written() { awk '{ print $7 }' "/sys/block/$NAME/stat"; }

echo "sysdisk-guest: $PHASE on $(uname -r), system disk $DISK (virtio-$SERIAL)"

# The layout every phase must see: / on sysvg/root (ext4), /var on
# sysvg/var (xfs), /boot on the disk's second partition (ext4).
check_layout() {
	local want got
	want="/ /dev/mapper/sysvg-root ext4
/boot /dev/${NAME}2 ext4
/var /dev/mapper/sysvg-var xfs"
	got=$(for m in / /boot /var; do findmnt -n -o TARGET,SOURCE,FSTYPE "$m"; done | awk '{ print $1, $2, $3 }')
	lsblk -o NAME,SIZE,TYPE,FSTYPE,PARTLABEL,MOUNTPOINT "$DISK" | indent
	if [ "$got" = "$want" ]; then ok layout_root_on_lvm_var_xfs_boot_partition; else
		fail layout_root_on_lvm_var_xfs_boot_partition "$(tr '\n' ';' <<<"$got")"
	fi
}

# The listing of every file of the snapshot of point $1: the LVs and
# /boot read from the snapshot image itself, which is what the point must
# equal (the running system moves on at once). The image has no partitions
# of its own and holds the same LVM metadata as the disk (same VG name and
# UUIDs): it is not given to LVM. Each file system is mapped by device-
# mapper read-only with the running system's own tables, shifted from the
# PV partition (or the disk) onto the image. First the file systems as
# they are in the snapshot must be clean (e2fsck -fn, xfs_repair -n):
# frozen at the take, ext4 needs no journal replay (XFS: see below). Then, mounted
# read-only: sha256 of every regular file (LISTS/take-N.sha256) and the
# tree (type, mode, owner, size, mtime, link target; LISTS/take-N.tree),
# paths under root/, boot/, var/.
take_listing() { # point image
	local n=$1 image=$2 m=/run/take fs table t0 ok=1
	local pv_start boot_start boot_size pv_devno
	t0=$(now)
	pv_start=$(cat "/sys/class/block/${NAME}3/start")
	pv_devno=$(cat "/sys/class/block/${NAME}3/dev")
	boot_start=$(cat "/sys/class/block/${NAME}2/start")
	boot_size=$(cat "/sys/class/block/${NAME}2/size")
	for fs in root var; do
		# One linear segment on the PV: "0 SIZE linear MAJ:MIN OFFSET".
		table=$(dmsetup table "sysvg-$fs")
		# shellcheck disable=SC2086 # its words
		set -- $table
		if [ $# != 5 ] || [ "$3" != linear ] || [ "$4" != "$pv_devno" ]; then
			fail "take${n}_listing" "sysvg-$fs is not one linear segment on ${NAME}3: $table"
			return 1
		fi
		dmsetup create --readonly "sysdisk-take-$fs" --table "0 $2 linear $image $((pv_start + $5))"
	done
	dmsetup create --readonly sysdisk-take-boot --table "0 $boot_size linear $image $boot_start"
	for fs in root boot; do
		e2fsck -fn "/dev/mapper/sysdisk-take-$fs" >/run/fsck.out 2>&1 ||
			{ ok=0; fail "take${n}_file_systems_clean_in_the_snapshot" "e2fsck -fn of $fs: $(tail -3 /run/fsck.out | tr '\n' ' ')"; }
		echo "    e2fsck -fn $fs at the take: $(tail -1 /run/fsck.out)"
	done
	# XFS: frozen, its log is covered (every change in place) but not
	# closed by an unmount record, so xfs_repair -n of the image, which
	# cannot replay it (read-only), would report it; the rescue boot
	# checks /var after a mount replays it. Here it is mounted
	# norecovery: nothing in that log is missing from the file system.
	echo "    xfs_repair -n of /var: after the restore (the covered log of a frozen XFS needs a writable mount first)"
	[ $ok = 1 ] && ok "take${n}_file_systems_clean_in_the_snapshot"
	mkdir -p $m/root $m/boot $m/var
	if mount -o ro /dev/mapper/sysdisk-take-root $m/root &&
		mount -o ro /dev/mapper/sysdisk-take-boot $m/boot &&
		mount -o ro,norecovery,nouuid /dev/mapper/sysdisk-take-var $m/var; then
		(cd $m && find root boot var -xdev -type f -print0 | sort -z | xargs -0 sha256sum) >"$LISTS/take-$n.sha256"
		(cd $m && find root boot var -xdev -printf '%y %m %U:%G %s %T@ %p -> %l\n' | sort) >"$LISTS/take-$n.tree"
		echo "    listing of point $n at its take: $(wc -l <"$LISTS/take-$n.sha256") files," \
			"$(du -sc --apparent-size -B1 $m/root $m/boot $m/var | tail -1 | cut -f1) bytes" \
			"($(grep -c . "$LISTS/take-$n.tree") tree entries), in $(since "$t0") s"
		grep ' var/log/sysdisk-writer.log$' "$LISTS/take-$n.sha256" | indent
		ok "take${n}_listing"
	else
		fail "take${n}_listing" "cannot mount the snapshot's file systems read-only"
	fi
	umount $m/root $m/boot $m/var 2>/dev/null
	dmsetup remove sysdisk-take-root sysdisk-take-var sysdisk-take-boot
	sync
}

# A backup of the whole running system disk: the transcript, then the
# listing of its snapshot, and the snapshot destroyed.
backup() { # full|incremental point
	local kind=$1 n=$2 out rc t0 secs id image w
	echo "    \$ blksnapctl backup $kind $DISK --store $B/store --limit 512M --to $POINTS --keep-snapshot"
	w=$(wc -l </var/log/sysdisk-writer.log)
	t0=$(now)
	out=$(blksnapctl backup "$kind" "$DISK" --store $B/store --limit 512M --to $POINTS --keep-snapshot 2>&1)
	rc=$?
	secs=$(since "$t0")
	echo "$out" | indent
	echo "      [exit $rc, $secs s; the writer appended $(($(wc -l </var/log/sysdisk-writer.log) - w)) records to /var meanwhile]"
	echo "$secs" >"$B/time-$n"
	if [ $rc != 0 ]; then
		fail "${kind}_backup_of_the_running_system_disk" "exit $rc"
		return 1
	fi
	id=$(sed -n 's/^snapshot \(.*\) kept$/\1/p' <<<"$out")
	image=/dev/$(blksnapctl --json snapshot info "$DISK" | jq -r .image)
	written >"$B/written-at-take-$n"
	if grep -q "froze /, /var for the take" <<<"$out" || grep -q "froze /var, / for the take" <<<"$out"; then
		ok "${kind}_backup_froze_the_lvs_file_systems"
	else
		fail "${kind}_backup_froze_the_lvs_file_systems" "no 'froze / and /var' in its output"
	fi
	step "$kind backup: point $n, snapshot $id, image $image"
	take_listing "$n" "$image"
	blksnapctl snapshot destroy "$id"
	step "listing of point $n"
	m=$POINTS/$NAME/point-$(printf %04d "$n").json
	if [ "$(jq -r .status "$m")" = complete ]; then
		ok "${kind}_backup_of_the_running_system_disk"
		jq -c '{point, kind, method, size, bytes_read, bytes_written}' "$m" | indent
	else
		fail "${kind}_backup_of_the_running_system_disk" "$m: $(jq -c . "$m" | head -c 300)"
	fi
}

# A writer on /var all along: a record appended every 20 ms, synced
# every 25th.
writer() {
	local i=0
	while [ ! -e /run/sysdisk-stop ]; do
		i=$((i + 1))
		printf '%(%s)T record %d %d%d%d\n' -1 $i $RANDOM $RANDOM $RANDOM >>/var/log/sysdisk-writer.log
		[ $((i % 25)) = 0 ] && sync /var/log/sysdisk-writer.log
		sleep 0.02
	done
}

# A day of a small server: an application update on / (new files over
# old ones), a database's pages rewritten in place on /var, logs
# appended, a package cache filled and partly cleaned, a setting edited.
# Prints the bytes it wrote.
workload() {
	local f i offs=() bytes=0
	for i in $(seq 1 40); do
		head -c 65536 /dev/urandom >"/srv/app/lib-$i.so"
	done
	bytes=$((bytes + 40 * 65536))
	for i in $(seq 1 1500); do
		offs+=(-c "pwrite -q -S $((i % 256)) $(((RANDOM * 32768 + RANDOM) % 8192 * 4096)) 4096")
	done
	xfs_io "${offs[@]}" -c fsync /var/lib/sysdisk/db
	bytes=$((bytes + 1500 * 4096))
	f=$(stat -c %s /var/log/sysdisk-app.log 2>/dev/null || echo 0)
	head -c 3145728 /dev/urandom | base64 >>/var/log/sysdisk-app.log
	bytes=$((bytes + $(stat -c %s /var/log/sysdisk-app.log) - f))
	for i in 7 8 9 10 11 12; do
		head -c 1048576 /dev/urandom >/var/cache/sysdisk/pkg-$i.deb
	done
	rm -f /var/cache/sysdisk/pkg-1.deb /var/cache/sysdisk/pkg-2.deb /var/cache/sysdisk/pkg-3.deb
	bytes=$((bytes + 6 * 1048576))
	echo "setting=$(date +%s)" >>/etc/sysdisk.conf
	sync
	echo $bytes
}

case $PHASE in
backup)
	f=$(cat "/sys/block/$NAME/filter" 2>/dev/null)
	if [ "$f" = blksnap ]; then ok system_disk_attached_by_the_initramfs; else
		fail system_disk_attached_by_the_initramfs "the filter of $NAME is '$f'"
	fi
	check_layout
	mkdir -p $LISTS $B/store /srv/app /var/lib/sysdisk /var/cache/sysdisk
	# The system's data before the day: an application, a database, a
	# package cache.
	for i in $(seq 1 40); do head -c 65536 /dev/urandom >"/srv/app/lib-$i.so"; done
	head -c $((32 << 20)) /dev/urandom >/var/lib/sysdisk/db
	for i in 1 2 3 4 5 6; do head -c 1048576 /dev/urandom >/var/cache/sysdisk/pkg-$i.deb; done
	echo "setting=0" >/etc/sysdisk.conf
	sync
	writer &
	wpid=$!
	sleep 1
	step "writer on /var running (pid $wpid)"
	backup full 1
	step "the day's workload"
	t0=$(now)
	w0=$(written)
	bytes=$(workload)
	echo "    workload: $bytes bytes written by the applications, $(since "$t0") s;" \
		"$(($(written) - w0)) sectors written to $NAME meanwhile (the writer's too)"
	echo "$bytes" >$B/workload-bytes
	backup incremental 2
	touch /run/sysdisk-stop
	wait $wpid
	echo "    the writer appended $(wc -l </var/log/sysdisk-writer.log) records in all"
	echo "    \$ blksnapctl backup list $POINTS"
	blksnapctl backup list $POINTS 2>&1 | indent
	for n in 1 2; do
		p=$POINTS/$NAME/point-000$n.qcow2
		echo "    point $n: $(stat -c %s "$p") bytes of qcow2 ($(du -B1 "$p" | cut -f1) allocated)"
	done
	# What changed between the two points, by their 64 KiB digests
	# (24 bytes of header, 32 bytes a block).
	d=$(cmp -l "$POINTS/$NAME/point-0001.digests" "$POINTS/$NAME/point-0002.digests" |
		awk '{ b = int(($1 - 1 - 24) / 32); if (!(b in s)) { s[b] = 1; n++ } } END { print n + 0 }')
	echo "    between the takes: $d blocks of 64 KiB differ ($((d * 65536)) bytes);" \
		"$(($(cat $B/written-at-take-2) - $(cat $B/written-at-take-1))) sectors written to $NAME"
	echo "$d" >$B/changed-blocks
	;;
restored | restored_big | instant)
	check_layout
	# GRUB's linux command puts BOOT_IMAGE first on the command line.
	if grep -q '^BOOT_IMAGE=/vmlinuz-' /proc/cmdline; then ok booted_by_grub_from_the_disk; else
		fail booted_by_grub_from_the_disk "$(cat /proc/cmdline)"
	fi
	echo "    command line: $(cat /proc/cmdline)"
	echo "    disk $DISK: $(blockdev --getsize64 "$DISK") bytes"
	# Every file of the take's listing, where this system has it: the
	# ones this boot wrote are named (the journal, systemd's state).
	n=$(find $LISTS -name 'take-*.sha256' | sed 's/.*take-\(.*\)\.sha256/\1/' | sort -n | tail -1)
	sed -e 's|  root/|  /|' -e 's|  boot/|  /boot/|' -e 's|  var/|  /var/|' "$LISTS/take-$n.sha256" >/run/take.sha256
	sha256sum -c --quiet /run/take.sha256 >/run/check.out 2>&1
	total=$(wc -l </run/take.sha256)
	bad=$(grep -c ': FAILED' /run/check.out)
	others=$(grep ': FAILED' /run/check.out | grep -v -E '^/var/(log/journal/|lib/systemd/|log/wtmp:)' | grep -c .)
	echo "    files of point $n's take: $total, identical $((total - bad)), changed by this boot $bad (the journal, systemd's state, wtmp):"
	grep ': FAILED' /run/check.out | head -5 | indent
	if [ "$others" = 0 ] && [ "$total" -gt 1000 ]; then
		ok files_identical_to_the_take
	else
		fail files_identical_to_the_take "$others files differ outside the journal and systemd's state: $(grep ': FAILED' /run/check.out | grep -v -E '^/var/(log/journal/|lib/systemd/|log/wtmp:)' | head -3 | tr '\n' ' ')"
	fi
	if grep -q ' /var/log/sysdisk-writer.log$' /run/take.sha256 &&
		! grep -q '^/var/log/sysdisk-writer.log: FAILED' /run/check.out; then
		ok writer_log_as_at_the_take
		echo "    /var/log/sysdisk-writer.log: $(wc -l </var/log/sysdisk-writer.log) records, the last: $(tail -1 /var/log/sysdisk-writer.log)"
	else
		fail writer_log_as_at_the_take "the writer's log differs from the take's"
	fi
	if umount /boot && e2fsck -fn "${DISK}2" >/run/fsck.out 2>&1; then
		ok boot_fsck_clean
		echo "    e2fsck -fn ${DISK}2: $(tail -1 /run/fsck.out)"
	else
		fail boot_fsck_clean "$(tail -3 /run/fsck.out | tr '\n' ' ')"
	fi
	mount /boot
	;;
*)
	fail serial "no system disk of a known serial (virtio-sysdisk*)"
	;;
esac
sync
echo "sysdisk-guest: $SERIAL done"
