#!/bin/bash
# shellcheck disable=SC2154 # dracut sets dracutsysrootdir, initdir, moddir
# SPDX-License-Identifier: GPL-2.0
#
# blksnap: CBT for the root disk (dracut module). The disk of the root file
# system is checked and mounted by the initramfs, so its change tracking
# must be attached there, before anything writes to it: a write before the
# attach is beyond any filter, and the saved CBT is not restored onto a
# device written before its attach.
#
# Included when /etc/blksnap/cbt.conf exists (or when asked for with
# --add blksnap): the blksnap module, blksnapctl, the configuration, a udev
# rule that attaches + persists each listed device that appears once the
# module is loaded, and a pre-mount hook (blksnap-cbt.sh) that loads the
# module and runs `blksnapctl cbt boot`. pre-mount runs once the root device
# is there (after the initqueue) and before it is checked and mounted
# (dracut-pre-mount.service is ordered before systemd-fsck-root.service and
# sysroot.mount; without systemd, fsck runs in the mount hook).
#
# Install: /usr/lib/dracut/modules.d/90blksnap/ (this file and
# blksnap-cbt.sh), then dracut -f.

# called by dracut
check() {
	require_binaries /usr/sbin/blksnapctl || return 1
	# Wanted only with a configuration.
	[[ -e $dracutsysrootdir/etc/blksnap/cbt.conf ]] || return 255
	return 0
}

# called by dracut
depends() {
	echo udev-rules
	return 0
}

# called by dracut
installkernel() {
	hostonly='' instmods blksnap
}

# called by dracut
install() {
	inst_binary /usr/sbin/blksnapctl
	[[ -e $dracutsysrootdir/etc/blksnap/cbt.conf ]] && inst_simple /etc/blksnap/cbt.conf
	# The rule of the installed system with one condition more: it runs
	# only once the module is there (the hook loads it).
	mkdir -p "$initdir/etc/udev/rules.d"
	cat >"$initdir/etc/udev/rules.d/60-blksnap-cbt.rules" <<'RULE'
# blksnap: CBT for the root disk, in the initramfs (dracut 90blksnap)
ACTION=="add", SUBSYSTEM=="block", TEST=="/dev/blksnap-control", RUN+="/usr/sbin/blksnapctl cbt boot --device $devnode"
RULE
	inst_hook pre-mount 10 "$moddir/blksnap-cbt.sh"
}
