#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The system disk of the live system disk test (run.sh sysdisk): a minimal
# Debian bookworm with systemd, laid out as a real server's disk and booted
# like one: SeaBIOS, GRUB from the disk, the kernel and initramfs from its
# /boot, the root file system on LVM. Prints one line: the disk image (raw,
# 1 GiB, sparse) in $BLKSNAP_CACHE/sysdisk, which the caller must not
# change (run.sh boots a qcow2 overlay of it).
#
# The disk (GPT; sectors of 512 bytes):
#   part 1  sectors 2048-4095     BIOS boot partition: GRUB's core.img
#   part 2  sectors 4096-135167   /boot, ext4 (label sysboot, partlabel
#                                 sysboot): the kernel, the initramfs, GRUB
#   part 3  sectors 135168-end    LVM physical volume of the VG sysvg:
#           sysvg/root  448 MiB   /, ext4
#           sysvg/var   320 MiB   /var, xfs (mkfs.xfs's smallest is 300 MB)
#           the rest of the VG free (about 190 MiB)
# The MBR holds GRUB's boot.img (GPT's protective entry kept). GRUB reads
# (hd0,gpt2)/grub/grub.cfg: the test kernel with root=/dev/mapper/sysvg-root
# and the console on ttyS0 (GRUB's own lines too). The initramfs is made by
# the system's own update-initramfs (initramfs-tools with lvm2's hook, which
# activates the root LV, and blk-snap's hook, which loads the module and
# attaches the disk before the root file system is checked and mounted).
#
# Two cached steps, each keyed by a hash of what goes into it:
#   base-KEY.tar   mmdebstrap's system (the packages below): minutes, and
#                  rebuilt only when this list or the base step changes;
#   image-KEY.img  the base + the kernel (bzImage, modules.builtin),
#                  blksnap.ko, blksnapctl, dist/, the test's unit; the
#                  initramfs made in a chroot; LVM made on the host without
#                  device-mapper (lvm's activation = 0: metadata only; the
#                  LVs' file systems are made at their extents' offsets).
#
# The test's disks are named by their QEMU serials: virtio-sysdisk (this
# disk, tracked from the initramfs: /etc/blksnap/cbt.conf),
# virtio-sysdisk-state (the CBT state device, absent on a restored system),
# virtio-sysdisk-backup (ext4, mounted at /backup, made by run.sh with the
# guest's script sysdisk-guest.sh on it; the unit
# blksnap-sysdisk-test.service runs it and powers off).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
KOUT=${KBUILD_OUTPUT:-$(cat "$CACHE/kbuild-output")}
KVER=$(cat "$KOUT/include/config/kernel.release")
KO=$REPO/blk_snap/blksnap.ko
CTL=$REPO/target/release/blksnapctl
BZIMAGE=$KOUT/arch/x86/boot/bzImage
DIR=$CACHE/sysdisk
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,udev,initramfs-tools,busybox,e2fsprogs,kmod,jq,lz4,lvm2,xfsprogs,grub-pc-bin,grub2-common
DISK_MIB=1024
BOOT_START=4096 BOOT_SECTORS=131072 PV_START=135168
ROOT_MIB=448 VAR_MIB=320

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
	echo "sysdisk-image: building the base system ($SUITE, mmdebstrap, a few minutes)" >&2
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

for f in "$KO" "$CTL" "$BZIMAGE"; do
	[ -f "$f" ] || {
		echo "sysdisk-image: $f is missing (make module tools)" >&2
		exit 1
	}
done


# --- image begin
key=$( {
	echo "$base_key $KVER $DISK_MIB $BOOT_START $BOOT_SECTORS $PV_START $ROOT_MIB $VAR_MIB"
	sha256sum "$KO" "$CTL" "$BZIMAGE" "$KOUT/modules.builtin" "$KOUT/modules.builtin.modinfo" "$KOUT/.config" |
		cut -d' ' -f1
	find "$REPO/dist" -type f -print0 | sort -z | xargs -0 sha256sum | sed "s|$REPO/||"
	section image
} | sha256sum | cut -c1-16)
IMG=$DIR/image-$key.img
if [ ! -f "$IMG" ]; then
	echo "sysdisk-image: assembling the system disk (key $key)" >&2
	# Older images: a run that uses one keeps it open (run.sh's overlay).
	rm -f "$DIR"/image-*.img
	tree=$(mktemp -d "$DIR/tree.XXXXXX")
	loops=()
	cleanup() {
		local l
		for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
		rm -rf "$tree" "$tree.boot" "$tree.var" "$tree.lvm" "$tree.mnt"
	}
	trap cleanup EXIT
	tar -C "$tree" -xf "$BASE"
	# The kernel (GRUB loads it from /boot), its module tree: blksnap.ko
	# and the lists depmod and initramfs-tools read.
	install -m 0644 "$BZIMAGE" "$tree/boot/vmlinuz-$KVER"
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
	mkdir -p "$tree/etc/systemd/system/blksnap-cbt.service.d"
	printf '[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n' \
		>"$tree/etc/systemd/system/blksnap-cbt.service.d/console.conf"
	# The whole disk is tracked from the initramfs on. Its table has an
	# LVM PV, which nothing can prove unwritten between boots: a saved
	# CBT is only used with accept-missed-writes (see README.md).
	mkdir -p "$tree/etc/blksnap"
	cat >"$tree/etc/blksnap/cbt.conf" <<-'EOF'
		# The live system disk test (tests/qemu/run.sh sysdisk).
		state /dev/disk/by-id/virtio-sysdisk-state
		track /dev/disk/by-id/virtio-sysdisk sysdisk accept-missed-writes
	EOF
	cat >"$tree/etc/fstab" <<-'EOF'
		/dev/mapper/sysvg-root / ext4 errors=remount-ro 0 1
		PARTLABEL=sysboot /boot ext4 defaults 0 2
		/dev/mapper/sysvg-var /var xfs defaults 0 2
		/dev/disk/by-id/virtio-sysdisk-backup /backup ext4 nofail 0 0
	EOF
	mkdir -p "$tree/backup"
	echo sysdisk >"$tree/etc/hostname"
	# The test: sysdisk-guest.sh on the backup disk, once the system is
	# up; it powers the machine off.
	cat >"$tree/etc/systemd/system/blksnap-sysdisk-test.service" <<-'EOF'
		[Unit]
		Description=blk-snap live system disk test
		After=local-fs.target blksnap-cbt.service systemd-udev-settle.service
		Wants=systemd-udev-settle.service
		RequiresMountsFor=/backup
		ConditionPathExists=/backup/sysdisk-guest.sh

		[Service]
		Type=oneshot
		ExecStart=/bin/bash /backup/sysdisk-guest.sh
		ExecStopPost=/bin/systemctl --no-block poweroff
		TimeoutStartSec=infinity
		# Its lines as they are (journal+console would prefix them).
		StandardOutput=file:/dev/console
		StandardError=inherit

		[Install]
		WantedBy=multi-user.target
	EOF
	mkdir -p "$tree/etc/systemd/system/multi-user.target.wants"
	ln -s /etc/systemd/system/blksnap-sysdisk-test.service \
		"$tree/etc/systemd/system/multi-user.target.wants/"
	# No login prompts: nobody logs in.
	ln -s /dev/null "$tree/etc/systemd/system/serial-getty@ttyS0.service"
	ln -s /dev/null "$tree/etc/systemd/system/getty@tty1.service"
	# lz4: fast to unpack under TCG with KASAN (see rootdisk-image.sh).
	printf 'COMPRESS=lz4\nFSTYPE=ext4\nRESUME=none\n' >"$tree/etc/initramfs-tools/conf.d/blksnap-test"
	# The initramfs, made inside the system by its own initramfs-tools;
	# and GRUB's core image (BIOS, GPT, ext2 driver for /boot; the rest
	# of GRUB's modules are loaded from /boot/grub/i386-pc).
	# shellcheck disable=SC2016 # expanded by the inner shell
	unshare -m --propagation private bash -euc '
		tree=$1 kver=$2
		mount -t proc proc "$tree/proc"
		mount -t sysfs sysfs "$tree/sys"
		mount --bind /dev "$tree/dev"
		chroot "$tree" update-initramfs -c -k "$kver"
		mkdir -p "$tree/boot/grub/i386-pc"
		chroot "$tree" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img \
			-p "(hd0,gpt2)/grub" biosdisk part_gpt ext2
	' - "$tree" "$KVER" >"$DIR/update-initramfs.log" 2>&1 || {
		cat "$DIR/update-initramfs.log" >&2
		exit 1
	}
	grep -E '^(W|E):' "$DIR/update-initramfs.log" >&2 || true
	cp "$tree"/usr/lib/grub/i386-pc/*.mod "$tree"/usr/lib/grub/i386-pc/*.lst \
		"$tree"/usr/lib/grub/i386-pc/boot.img "$tree/boot/grub/i386-pc/"
	# No menu: GRUB says what it loads on the serial console and boots.
	cat >"$tree/boot/grub/grub.cfg" <<-EOF
		serial --unit=0 --speed=115200
		terminal_input serial
		terminal_output serial
		echo "GRUB: sysdisk, /boot on \$root; loading /vmlinuz-$KVER"
		linux /vmlinuz-$KVER root=/dev/mapper/sysvg-root ro console=ttyS0 oops=panic panic=-1 softlockup_panic=0 hung_task_panic=0
		echo "GRUB: loading /initrd.img-$KVER"
		initrd /initrd.img-$KVER
		echo "GRUB: booting"
		boot
	EOF
	# Each file system's tree: /boot and /var apart from the root's.
	mv "$tree/boot" "$tree.boot" && mkdir "$tree/boot"
	mv "$tree/var" "$tree.var" && mkdir "$tree/var"
	# The disk: GPT, then the PV's metadata (lvm without device-mapper,
	# on a loop device over the partition; its own configuration: no
	# metadata backups in the host's /etc/lvm, no other device scanned).
	truncate -s 0 "$IMG.tmp"
	truncate -s ${DISK_MIB}M "$IMG.tmp"
	sgdisk -n 1:2048:$((BOOT_START - 1)) -t 1:EF02 -c 1:biosboot \
		-n 2:$BOOT_START:$((BOOT_START + BOOT_SECTORS - 1)) -t 2:8300 -c 2:sysboot \
		-n 3:$PV_START:0 -t 3:8E00 -c 3:sysvg "$IMG.tmp" >/dev/null
	pv_end=$(sgdisk -i 3 "$IMG.tmp" | awk '/^Last sector:/ { print $3 }')
	pv=$(losetup -f --show --offset $((PV_START * 512)) \
		--sizelimit $(((pv_end + 1 - PV_START) * 512)) "$IMG.tmp")
	loops+=("$pv")
	lvmdir=$tree.lvm
	mkdir -p "$lvmdir"
	printf '%s\n' 'global { activation = 0 }' 'backup { backup = 0 archive = 0 }' \
		'devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 }' >"$lvmdir/lvm.conf"
	lvm() {
		local out
		out=$(LVM_SYSTEM_DIR=$lvmdir LVM_SUPPRESS_FD_WARNINGS=1 command lvm "$1" --devices "$pv" "${@:2}" 2>&1) || {
			echo "$out" >&2
			return 1
		}
		grep -v -e 'Activation disabled' -e 'not zeroed' -e 'NOT backed up' -e 'successfully created' -e ' created\.$' <<<"$out" >&2 || true
	}
	lvm pvcreate -q "$pv"
	lvm vgcreate -q -s 4M sysvg "$pv"
	lvm lvcreate -q -an -Zn -n root -L ${ROOT_MIB}M sysvg
	lvm lvcreate -q -an -Zn -n var -L ${VAR_MIB}M sysvg
	# The LVs' first sectors on the disk: the partition's start, the PV's
	# data area, the first extent (each is one segment of 4 MiB extents).
	pe_start=$(LVM_SYSTEM_DIR=$lvmdir LVM_SUPPRESS_FD_WARNINGS=1 command lvm pvs --devices "$pv" \
		--noheadings --units s --nosuffix -o pe_start "$pv" 2>/dev/null | tr -d ' ')
	lv_start() {
		local r
		r=$(LVM_SYSTEM_DIR=$lvmdir LVM_SUPPRESS_FD_WARNINGS=1 command lvm lvs --devices "$pv" \
			--noheadings -o seg_pe_ranges "sysvg/$1" 2>/dev/null | tr -d ' ')
		r=${r#*:}
		echo $((PV_START + pe_start + ${r%-*} * 8192))
	}
	root_start=$(lv_start root) var_start=$(lv_start var)
	losetup -d "$pv"
	loops=()
	rm -rf "$lvmdir"
	# Initialized now: no lazy init writing in the guest.
	mkfs.ext4 -q -F -L sysboot -E offset=$((BOOT_START * 512)),lazy_itable_init=0,lazy_journal_init=0 \
		-d "$tree.boot" "$IMG.tmp" "$((BOOT_SECTORS / 2))k" >&2
	mkfs.ext4 -q -F -L root -E offset=$((root_start * 512)),lazy_itable_init=0,lazy_journal_init=0 \
		-d "$tree" "$IMG.tmp" "$((ROOT_MIB * 1024))k" >&2
	var=$(losetup -f --show --offset $((var_start * 512)) --sizelimit $((VAR_MIB << 20)) "$IMG.tmp")
	loops+=("$var")
	mkfs.xfs -q -f -L var "$var"
	# shellcheck disable=SC2016 # expanded by the inner shell
	unshare -m --propagation private bash -euc '
		mkdir -p "$2.mnt"
		mount "$1" "$2.mnt"
		cp -a "$2.var/." "$2.mnt/"
		umount "$2.mnt"
		rmdir "$2.mnt"
	' - "$var" "$tree"
	losetup -d "$var"
	loops=()
	# GRUB for BIOS, as grub-install does it on a GPT disk: boot.img in
	# the MBR (its BPB area and the protective partition table kept), the
	# sector of core.img in it; core.img in the BIOS boot partition, the
	# list of its sectors after the first in its first sector.
	python3 - "$IMG.tmp" "$tree.boot/grub/i386-pc/boot.img" "$tree.boot/grub/i386-pc/core.img" <<-'PY'
		import struct, sys
		img, boot, core = sys.argv[1], open(sys.argv[2], "rb").read(), bytearray(open(sys.argv[3], "rb").read())
		first = 2048  # the BIOS boot partition
		core += bytes(-len(core) % 512)
		assert len(boot) == 512 and len(core) <= 2048 * 512
		with open(img, "r+b") as f:
		    mbr = bytearray(f.read(512))
		    new = bytearray(boot)
		    new[0x3:0x5a] = mbr[0x3:0x5a]
		    new[0x1b8:0x1fe] = mbr[0x1b8:0x1fe]
		    new[0x5c:0x64] = struct.pack("<Q", first)
		    new[0x66:0x68] = b"\x90\x90"
		    core[0x200 - 12:0x200] = struct.pack("<QHH", first + 1, len(core) // 512 - 1, 0x800 + 0x20)
		    core[0x200 - 24:0x200 - 12] = bytes(12)
		    f.seek(0)
		    f.write(new)
		    f.seek(first * 512)
		    f.write(core)
	PY
	mv "$IMG.tmp" "$IMG"
	rm -rf "$tree.boot" "$tree.var"
	echo "sysdisk-image: $(du -sh --apparent-size "$tree" | cut -f1) of files on /, image $IMG ($(du -h "$IMG" | cut -f1) used)" >&2
fi
# --- image end

echo "$IMG"
