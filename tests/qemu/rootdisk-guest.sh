#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The guest side of the root disk test (run.sh rootdisk): runs in the system
# of rootdisk-image.sh, from its unit blksnap-rootdisk-test.service, once
# the system is up; the unit powers the machine off when it ends. run.sh
# puts this file on the backup disk (/backup) and says which boot this is
# with rootdisk.phase=boot1|boot2|boot3 on the kernel command line. Prints
# `ok NAME` / `FAIL NAME: reason` lines on the console, then
# "rootdisk-guest: PHASE done".
#
#   boot1: the initramfs attached the root disk (its `cbt boot` could not
#          open the state device: it has no header yet); format the state
#          device, persist the root disk (nothing saved), a full backup of
#          the running root disk, then files written (their sha256 kept on
#          /backup); the shutdown saves the CBT.
#   boot2: the initramfs restored the root disk's CBT before fsck and mount
#          (run.sh checks the console); a persist now answers the same;
#          files written, an incremental of the running root disk by the
#          change map, copying only changed blocks; the point restored to
#          a raw file equals the snapshot image, and holds boot 1's and
#          boot 2's files (a read-only loop mount of the raw file).
#   boot3: booted with rd.blksnap=0: nothing attached the root disk before
#          systemd mounted it read-write, and blksnap-cbt.service is masked;
#          the root file system is written, then `cbt boot` attaches and
#          persists it: the saved CBT must not be restored (the device was
#          written before its attach).
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

ROOT_ID=/dev/disk/by-id/virtio-blksnap-root
STATE=/dev/disk/by-id/virtio-blksnap-state
B=/backup
FACTS=$B/facts
POINTS=$B/points
STORE=$B/store
DISK=$(readlink -f $ROOT_ID)
NAME=${DISK##*/}
PHASE=$(sed -n 's/.*rootdisk\.phase=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
T0=$(date +%s.%N)

ok() { echo "ok rootdisk_${PHASE}_$1"; }
fail() { echo "FAIL rootdisk_${PHASE}_$1: $2"; }
# The seconds since this script started, to one decimal.
elapsed() { awk -v t0="$T0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
step() { echo "    $(elapsed) s: $1"; }
# The sectors written to the root disk since boot (/sys/block/X/stat).
written() { awk '{ print $7 }' "/sys/block/$NAME/stat"; }
filter() { cat "/sys/block/$NAME/filter" 2>/dev/null; }

# A backup of the root disk kept as a snapshot: its report in $REPORT, the
# sha256 of its snapshot image in $IMAGE_SHA, the snapshot destroyed.
backup() { # full|incremental
	local id image
	if ! REPORT=$(blksnapctl --json backup "$1" "$DISK" --store $STORE --limit 256M \
		--to $POINTS --keep-snapshot); then
		return 1
	fi
	id=$(jq -r .snapshot <<<"$REPORT")
	image=$(jq -r '.devices[0].image' <<<"$REPORT")
	IMAGE_SHA=$(sha256sum "$image" | cut -d' ' -f1)
	blksnapctl snapshot destroy "$id" >/dev/null
	echo "    backup $1: $(jq -c '.devices[0] | {point, kind, method, size, copied}' <<<"$REPORT")"
	echo "    sha256 of the snapshot image $image: $IMAGE_SHA"
}

# Files of random data under /var/tmp/rootdisk, their sha256 in
# $FACTS/$1.sha256 (paths relative to /).
write_files() { # tag
	local f n=0
	mkdir -p /var/tmp/rootdisk || return 1
	for kib in 1024 256 4; do
		n=$((n + 1))
		f=var/tmp/rootdisk/$1-$n
		head -c $((kib * 1024)) /dev/urandom >"/$f" || return 1
	done
	sync
	(cd / && sha256sum var/tmp/rootdisk/"$1"-*) >"$FACTS/$1.sha256" || return 1
	sync
}

# The root file system must be writable once the boot is done: an ordering
# cycle through blksnap-cbt.service once made systemd drop
# systemd-remount-fs.service, and the root stayed read-only.
root_writable() {
	local opts
	opts=$(findmnt -n -o OPTIONS /)
	case ",$opts," in
	*,rw,*) ok root_file_system_writable ;;
	*) fail root_file_system_writable "/ is mounted $opts; $(systemctl is-active systemd-remount-fs.service 2>&1 | head -1)" ;;
	esac
}

echo "rootdisk-guest: $PHASE on $(uname -r), root disk $DISK ($ROOT_ID)"
mkdir -p $FACTS $STORE
root_writable

case $PHASE in
boot1)
	# The initramfs attached the root disk before the root file system
	# was mounted, though it could not open the state device yet.
	f=$(filter)
	if [ "$f" = blksnap ]; then ok root_disk_attached_by_the_initramfs; else
		fail root_disk_attached_by_the_initramfs "the filter of $NAME is '$f'"
	fi
	out=$(blksnapctl cbt state-device $STATE --format)
	echo "    $out"
	step "state device formatted"
	out=$(blksnapctl cbt persist "$DISK" --id $ROOT_ID)
	echo "    $out"
	if grep -q "no saved CBT under $ROOT_ID" <<<"$out"; then ok persisted_nothing_saved; else
		fail persisted_nothing_saved "persist said: $out"
	fi
	if backup full && [ "$(jq -r '.devices[0].method' <<<"$REPORT")" = full ]; then
		manifest=$(jq -r '.devices[0].manifest' <<<"$REPORT")
		if [ "$(jq -r .sha256 "$manifest")" = "$IMAGE_SHA" ]; then
			ok full_backup_of_the_running_root_disk
		else
			fail full_backup_of_the_running_root_disk "its manifest's sha256 is not the snapshot image's"
		fi
	else
		fail full_backup_of_the_running_root_disk "${REPORT:-no report}"
	fi
	step "full backup"
	if write_files boot1; then ok files_written_after_the_full_backup; else
		fail files_written_after_the_full_backup "see the lines above"
	fi
	sed 's/^/    /' $FACTS/boot1.sha256
	step "files written; the shutdown saves the CBT"
	;;
boot2)
	# Registered again after the initramfs (and blksnap-cbt.service): the
	# kernel answers with its first answer.
	out=$(blksnapctl cbt persist "$DISK" --id $ROOT_ID)
	echo "    $out"
	if grep -q ": CBT restored (generation" <<<"$out"; then ok persist_again_answers_restored; else
		fail persist_again_answers_restored "persist said: $out"
	fi
	write_files boot2 || fail files_written "see the lines above"
	step "files written"
	if backup incremental; then
		method=$(jq -r '.devices[0].method' <<<"$REPORT")
		size=$(jq -r '.devices[0].size' <<<"$REPORT")
		read=$(jq -r '.devices[0].copied.read' <<<"$REPORT")
		point=$(jq -r '.devices[0].point' <<<"$REPORT")
		chain=$(dirname "$(jq -r '.devices[0].file' <<<"$REPORT")")
		echo "    incremental: method $method, read $read of $size bytes ($(awk -v r="$read" -v s="$size" 'BEGIN { printf "%.2f", 100 * r / s }')% of the disk)"
		# Boot 1's and boot 2's files alone are 2.5 MiB; the whole disk
		# is read only by a digest incremental.
		if [ "$method" = cbt ] && [ "$read" -ge $((2 * 1284 * 1024)) ] &&
			[ $((read * 4)) -lt "$size" ]; then
			ok incremental_by_the_restored_map
		else
			fail incremental_by_the_restored_map "method $method, read $read of $size bytes"
		fi
	else
		point=
		fail incremental_by_the_restored_map "${REPORT:-no report}"
	fi
	step "incremental backup"
	if [ -n "$point" ]; then
		rm -f $B/restored.raw
		if r=$(blksnapctl --json restore --point "$point" "$chain" $B/restored.raw); then
			got=$(sha256sum $B/restored.raw | cut -d' ' -f1)
			if [ "$got" = "$IMAGE_SHA" ]; then
				ok restored_point_equals_the_snapshot_image
				echo "    point $point equals the snapshot image (sha256 $got)"
			else
				fail restored_point_equals_the_snapshot_image "point $point restored hashes to $got, the snapshot image to $IMAGE_SHA (restore said $r)"
			fi
		else
			fail restored_point_equals_the_snapshot_image "restore --point $point failed"
		fi
		step "restored and compared"
		mnt=/run/rootdisk-restored
		mkdir -p $mnt
		if loop=$(losetup -r -P -f --show $B/restored.raw) &&
			mount -o ro,noload "${loop}p2" $mnt; then
			for tag in boot1 boot2; do
				if out=$(cd $mnt && sha256sum -c --quiet "$FACTS/$tag.sha256" 2>&1); then
					ok "restored_point_holds_the_${tag}_files"
				else
					fail "restored_point_holds_the_${tag}_files" "$(echo "$out" | head -3 | tr '\n' ' ')"
				fi
			done
			umount $mnt
		else
			fail restored_point_holds_the_boot1_files "cannot mount ${loop:-the loop device}p2"
		fi
		[ -n "${loop:-}" ] && losetup -d "$loop"
		rm -f $B/restored.raw
		step "files checked in the restored point"
	fi
	;;
boot3)
	f=$(filter)
	if [ -z "$f" ] && ! [ -e /dev/blksnap-control ]; then
		ok not_attached_before_the_root_file_system_was_mounted
	else
		fail not_attached_before_the_root_file_system_was_mounted "filter '$f', module $(cat /sys/module/blksnap/initstate 2>/dev/null)"
	fi
	echo "written before the attach" >/var/tmp/rootdisk/boot3
	sync
	echo "    $(written) sectors written to $NAME since boot, none seen by a filter"
	modprobe blksnap
	out=$(blksnapctl cbt boot 2>&1)
	while IFS= read -r l; do echo "    cbt boot: $l"; done <<<"$out"
	line=$(grep "^$ROOT_ID: " <<<"$out")
	case $line in
	*": CBT restored"*)
		fail saved_cbt_not_restored_after_unseen_writes "restored although $NAME was written before its attach: $line"
		;;
	*"saved CBT not used: EBUSY"*)
		ok saved_cbt_not_restored_after_unseen_writes
		;;
	*)
		fail saved_cbt_not_restored_after_unseen_writes "no verdict for $ROOT_ID: $line"
		;;
	esac
	step "cbt boot"
	;;
*)
	fail phase "unknown phase '$PHASE' (rootdisk.phase= on the kernel command line)"
	;;
esac
sync
echo "rootdisk-guest: $PHASE done"
