#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The system disk of the root disk test (run.sh rootdisk): a minimal Debian
# bookworm with systemd on ext4, booted through an initramfs that
# initramfs-tools built inside it with blk-snap's hook. Prints two lines:
# the disk image (raw, 512 MiB, sparse) and the initramfs, both in
# $BLKSNAP_CACHE/rootdisk, which the caller must not change (run.sh boots a
# qcow2 overlay of the image).
#
# Two cached steps, each keyed by a hash of what goes into it:
#   base-KEY.tar   mmdebstrap's system (the packages below, from Debian's
#                  mirror): minutes, and rebuilt only when this list or
#                  the base step of this script changes;
#   image-KEY.img  the base + the kernel's modules (blksnap.ko, built by
#   image-KEY.initrd  `make module`), blksnapctl (target/release), dist/
#                  (udev rule, units, shutdown hook, initramfs-tools hook),
#                  /etc/blksnap/cbt.conf, the test's unit; then
#                  update-initramfs for the test kernel's release in a
#                  chroot: about a minute, redone when any of them changes.
#
# The disk (dos label): vda1, 8 MiB of ext4, never mounted (a /boot, say);
# vda2, the rest, ext4, the root file system. Every partition holds a file
# system, so the whole disk has a fingerprint (the table and both
# superblocks) and its saved CBT may be restored. The test's disks are named by their QEMU serials:
# virtio-blksnap-root (tracked), virtio-blksnap-state (the CBT state
# device), virtio-blksnap-backup (ext4, mounted at /backup, made by run.sh
# with the guest's test script rootdisk-guest.sh on it).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
KOUT=${KBUILD_OUTPUT:-$(cat "$CACHE/kbuild-output")}
KVER=$(cat "$KOUT/include/config/kernel.release")
KO=$REPO/blk_snap/blksnap.ko
CTL=$REPO/target/release/blksnapctl
DIR=$CACHE/rootdisk
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,udev,initramfs-tools,busybox,e2fsprogs,kmod,jq,lz4
DISK_MIB=512
PART1_START=2048 PART1_SECTORS=16384

for f in "$KO" "$CTL" "$KOUT/arch/x86/boot/bzImage"; do
	[ -f "$f" ] || {
		echo "rootdisk-image: $f is missing (make module tools)" >&2
		exit 1
	}
done
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9

# The part of this script a step's output depends on: the text between its
# markers (so that editing comments elsewhere rebuilds nothing).
section() {
	sed -n "/^# --- $1 begin/,/^# --- $1 end/p" "$0"
}

# --- base begin
base_key=$( {
	echo "$SUITE $PACKAGES"
	section base
} | sha256sum | cut -c1-16)
BASE=$DIR/base-$base_key.tar
if [ ! -f "$BASE" ]; then
	echo "rootdisk-image: building the base system ($SUITE, mmdebstrap, a few minutes)" >&2
	rm -f "$DIR"/base-*.tar
	# No documentation, man pages or translations: a smaller disk.
	# shellcheck disable=SC2016 # mmdebstrap's hook expands $1
	nice mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-include=/usr/share/doc/*/copyright' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-exclude=/usr/share/info/*' \
		--customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
		"$SUITE" "$DIR/base.tmp.tar" >&2
	mv "$DIR/base.tmp.tar" "$BASE"
fi
# --- base end

# --- image begin
key=$( {
	echo "$base_key $KVER $DISK_MIB $PART1_START $PART1_SECTORS"
	sha256sum "$KO" "$CTL" "$KOUT/modules.builtin" "$KOUT/modules.builtin.modinfo" "$KOUT/.config" |
		cut -d' ' -f1
	find "$REPO/dist" -type f -print0 | sort -z | xargs -0 sha256sum | sed "s|$REPO/||"
	section image
} | sha256sum | cut -c1-16)
IMG=$DIR/image-$key.img
INITRD=$DIR/image-$key.initrd
if [ ! -f "$IMG" ] || [ ! -f "$INITRD" ]; then
	echo "rootdisk-image: assembling the system disk (key $key)" >&2
	# Older images: a run that uses one keeps it open (run.sh's overlay).
	rm -f "$DIR"/image-*.img "$DIR"/image-*.initrd
	tree=$(mktemp -d "$DIR/tree.XXXXXX")
	trap 'umount -R "$tree" 2>/dev/null || true; rm -rf "$tree"' EXIT
	tar -C "$tree" -xf "$BASE"
	# The kernel's module tree: blksnap.ko and the lists depmod and
	# initramfs-tools read.
	mods=$tree/lib/modules/$KVER
	install -D -m 0644 "$KO" "$mods/extra/blksnap.ko"
	cp "$KOUT/modules.builtin" "$KOUT/modules.builtin.modinfo" "$KOUT/modules.order" "$mods/"
	install -D -m 0644 "$KOUT/.config" "$tree/boot/config-$KVER"
	depmod -b "$tree" "$KVER"
	# blk-snap as `make install` would put it, with PREFIX=/usr.
	install -m 0755 "$CTL" "$tree/usr/sbin/blksnapctl"
	install -m 0644 "$REPO/dist/udev/60-blksnap-cbt.rules" "$tree/etc/udev/rules.d/"
	install -m 0644 "$REPO/dist/systemd/blksnap-cbt.service" "$tree/etc/systemd/system/"
	install -D -m 0755 "$REPO/dist/systemd/blksnap-cbt.shutdown" \
		"$tree/usr/lib/systemd/system-shutdown/blksnap-cbt.shutdown"
	install -D -m 0755 "$REPO/dist/initramfs-tools/hooks/blksnap" \
		"$tree/usr/share/initramfs-tools/hooks/blksnap"
	install -D -m 0755 "$REPO/dist/initramfs-tools/scripts/init-premount/blksnap" \
		"$tree/usr/share/initramfs-tools/scripts/init-premount/blksnap"
	mkdir -p "$tree/etc/systemd/system/sysinit.target.wants"
	ln -s /etc/systemd/system/blksnap-cbt.service "$tree/etc/systemd/system/sysinit.target.wants/"
	# The unit's `cbt boot` and `cbt save` on the console too.
	mkdir -p "$tree/etc/systemd/system/blksnap-cbt.service.d"
	printf '[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n' \
		>"$tree/etc/systemd/system/blksnap-cbt.service.d/console.conf"
	mkdir -p "$tree/etc/blksnap"
	cat >"$tree/etc/blksnap/cbt.conf" <<-'EOF'
		# The root disk test (tests/qemu/run.sh rootdisk).
		state /dev/disk/by-id/virtio-blksnap-state
		track /dev/disk/by-id/virtio-blksnap-root
	EOF
	cat >"$tree/etc/fstab" <<-'EOF'
		/dev/vda2 / ext4 errors=remount-ro 0 1
		/dev/disk/by-id/virtio-blksnap-backup /backup ext4 nofail 0 0
	EOF
	mkdir -p "$tree/backup"
	echo blksnap-root >"$tree/etc/hostname"
	# The test: rootdisk-guest.sh on the backup disk, once the system is
	# up; it powers the machine off.
	cat >"$tree/etc/systemd/system/blksnap-rootdisk-test.service" <<-'EOF'
		[Unit]
		Description=blk-snap root disk test
		After=local-fs.target blksnap-cbt.service systemd-udev-settle.service
		Wants=systemd-udev-settle.service
		RequiresMountsFor=/backup
		ConditionPathExists=/backup/rootdisk-guest.sh

		[Service]
		Type=oneshot
		ExecStart=/bin/bash /backup/rootdisk-guest.sh
		ExecStopPost=/bin/systemctl --no-block poweroff
		# Its lines as they are (journal+console would prefix them).
		StandardOutput=file:/dev/console
		StandardError=inherit

		[Install]
		WantedBy=multi-user.target
	EOF
	mkdir -p "$tree/etc/systemd/system/multi-user.target.wants"
	ln -s /etc/systemd/system/blksnap-rootdisk-test.service \
		"$tree/etc/systemd/system/multi-user.target.wants/"
	# No login prompts: nobody logs in.
	ln -s /dev/null "$tree/etc/systemd/system/serial-getty@ttyS0.service"
	ln -s /dev/null "$tree/etc/systemd/system/getty@tty1.service"
	# fsck of the root file system in the initramfs, as on a real system.
	# lz4: the kernel unpacks the initramfs before it runs anything, and
	# under TCG with KASAN inflating 7 MB of gzip took 75 s, long enough
	# for a soft lockup report; lz4 is many times faster to unpack.
	printf 'COMPRESS=lz4\nFSTYPE=ext4\n' >"$tree/etc/initramfs-tools/conf.d/blksnap-test"
	# The initramfs, made inside the system by its own initramfs-tools.
	# shellcheck disable=SC2016 # expanded by the inner shell
	unshare -m --propagation private bash -euc '
		tree=$1 kver=$2
		mount -t proc proc "$tree/proc"
		mount -t sysfs sysfs "$tree/sys"
		mount --bind /dev "$tree/dev"
		chroot "$tree" update-initramfs -c -k "$kver"
	' - "$tree" "$KVER" >"$DIR/update-initramfs.log" 2>&1 || {
		cat "$DIR/update-initramfs.log" >&2
		exit 1
	}
	grep -E '^(W|E):' "$DIR/update-initramfs.log" >&2 || true
	cp "$tree/boot/initrd.img-$KVER" "$INITRD.tmp"
	# The disk: a dos label, an empty ext4 at vda1's offset, then ext4 made
	# from the tree at vda2's offset.
	truncate -s 0 "$IMG.tmp"
	truncate -s ${DISK_MIB}M "$IMG.tmp"
	start2=$((PART1_START + PART1_SECTORS))
	printf 'label: dos\nstart=%s, size=%s, type=83\nstart=%s, type=83\n' \
		$PART1_START $PART1_SECTORS $start2 | sfdisk --quiet "$IMG.tmp" >/dev/null
	mkfs.ext4 -q -F -L boot -E offset=$((PART1_START * 512)),lazy_itable_init=0,lazy_journal_init=0 \
		"$IMG.tmp" "$((PART1_SECTORS / 2))k" >&2
	kib=$(((DISK_MIB * 2048 - start2) / 2))
	# Initialized now: no lazy init writing in the guest.
	mkfs.ext4 -q -F -L root -E offset=$((start2 * 512)),lazy_itable_init=0,lazy_journal_init=0 \
		-d "$tree" "$IMG.tmp" "${kib}k" >&2
	mv "$INITRD.tmp" "$INITRD"
	mv "$IMG.tmp" "$IMG"
	echo "rootdisk-image: $(du -sh --apparent-size "$tree" | cut -f1) of files, image $IMG ($(du -h "$IMG" | cut -f1) used)" >&2
fi
# --- image end

echo "$IMG"
echo "$INITRD"
