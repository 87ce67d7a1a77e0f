#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# blksnap: CBT for the root disk, dracut's pre-mount hook (see
# module-setup.sh). Loads the module, waits for udev, and runs `blksnapctl
# cbt boot`: the state device of /etc/blksnap/cbt.conf is opened and every
# listed device present is attached and persisted (its saved CBT restored
# if it may be). After switch_root, blksnap-cbt.service and the udev rule
# run `cbt boot` again: the kernel answers a repeated persist with the
# first answer. rd.blksnap=0 on the kernel command line skips it.
# Sourced by dracut: no exit.

# shellcheck source=/dev/null
type getargbool >/dev/null 2>&1 || . /lib/dracut-lib.sh

blksnap_cbt_boot() {
	[ -e /etc/blksnap/cbt.conf ] || return 0
	if ! getargbool 1 rd.blksnap; then
		warn "blksnap: rd.blksnap=0: no CBT attached in the initramfs"
		return 0
	fi
	if ! modprobe blksnap; then
		warn "blksnap: cannot load the module: the CBT of the root disk is not restored"
		return 0
	fi
	udevadm settle --timeout=10
	/usr/sbin/blksnapctl cbt boot || warn "blksnap: cbt boot failed (see above)"
}

blksnap_cbt_boot
