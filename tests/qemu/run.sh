#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Boots the debug test kernel under QEMU (TCG, 2 vCPUs) with virtme-ng, the
# host's root filesystem shared read-only, and its virtio disks:
#   serial blksnap-a: 256 MiB, no partition table;
#   serial blksnap-b: 256 MiB, MBR with partitions at sectors 2048 and 67600;
#   serial blksnap-c, blksnap-d: 64 MiB each, for snapshots;
#   serial blksnap-e: 400 MiB, for file systems;
#   serial blksnap-f: 131073 sectors (64 MiB + 512 bytes), an odd size that
#     is not a multiple of 4 KiB (QEMU needs cache=writeback for it);
#   serial blksnap-g: 64 MiB whose writes QEMU throttles to 64 KiB/s, so that
#     a write stays in flight for seconds (the first write passes at once:
#     issue a sacrificial one first);
#   serial blksnap-h: 128 MiB of ext4 holding a PostgreSQL 15 cluster made
#     here with the host's binaries (initdb --data-checksums, pgbench -i -s
#     1; see pg_cluster below), for tests/qemu/guest/src/app.rs: small
#     enough for quick full backups, big enough for its data and WAL;
#   serial blksnap-p: read-only, a tar archive of the PostgreSQL programs
#     that test runs and the libraries they load (see pg_tools below).
# In bench mode the disks are instead (see bench_disks below): blksnap-e, the
# origin, BLKSNAP_BENCH_REGION MiB of random data; blksnap-a, the store disk
# (zeros), the region plus 32 MiB, at least 96 MiB; blksnap-b, -c, -d, 16
# MiB of random data each; all five throttled to BLKSNAP_BENCH_BPS bytes/s
# and BLKSNAP_BENCH_IOPS I/Os per second (each; 0: not throttled); and
# blksnap-i, 1 GiB, sparse and not throttled, for the incremental precision
# line; blksnap-t, read-only, a tar archive of the tools bench.sh starts often.
# Then runs tests/qemu/guest.sh MODE in the guest.
#
# In reboot mode (`run.sh reboot`, also run by `make test`) there are other
# disks instead: eleven small tracked disks (serials rb-ROLE, six of them
# ext4 made here), a 16 MiB CBT state device (blksnap-s, under dm in the
# guest) and its 16 MiB mirror (blksnap-m), and blksnap-k, 256 MiB of ext4
# for the backup chains (9p is too slow for them); the same kernel boots
# three times over them, each boot running guest.sh reboot RESULTS REPO
# bootN (see tests/qemu/guest/src/reboot.rs, which says what each disk
# tests), with its own console log console-N.log checked like in test mode.
# Between boots 1 and 2 the host writes a file into rb-host's image
# (debugfs -w), grows rb-r, and swaps the slots of rb-swapa and rb-swapb.
# Boot 2 ends with a power cut:
# once the guest prints its marker line with a writer to the data disk
# running, QEMU is killed (kill -9, its pid from -pidfile) while the writes
# go on. What a boot tells the next ones is in RESULTS/backups, which the
# guest writes through --rwdir.
#
# In rootdisk mode (`run.sh rootdisk`, also run by `make test`) the guest is
# not the host's 9p root but a Debian system of its own on a virtio disk
# (tests/qemu/rootdisk-image.sh builds it, cached): root=/dev/vda2 (ext4,
# serial blksnap-root, tracked as a whole disk), booted by QEMU directly
# (-kernel, -initrd: the initramfs built by initramfs-tools inside that
# system with dist/initramfs-tools) and run by systemd; serial
# blksnap-state, 16 MiB, the CBT state device; serial blksnap-backup, 3 GiB
# of ext4 (sparse) with the guest's script rootdisk-guest.sh, for the backup
# chain. Three boots over the same disks (rootdisk.phase=bootN): boot 1
# formats the state device and makes a full backup; boot 2's initramfs
# must restore the root disk's CBT before the root file system is checked
# and mounted (the console shows it), and its incremental must use it and
# equal the snapshot image; boot 3 has rd.blksnap=0: the root file system is
# mounted and written before the attach, so the saved CBT must not be
# restored. Console logs in console-N.log, checked like in test mode.
#
# In sysdisk mode (`run.sh sysdisk`, about 30 minutes: not in `make test`)
# the disks are a server's system disk and what its backup and restore
# need (see README.md, "Backing up and restoring the system disk"): a
# Debian system on a 1 GiB GPT disk, /boot and an LVM PV with root (ext4)
# and /var (xfs) (tests/qemu/sysdisk-image.sh builds it, cached), booted
# by SeaBIOS and the disk's own GRUB, kernel and initramfs; five boots,
# each checked like a rootdisk boot (console-TAG.log): the live system
# (serial sysdisk, the guest's sysdisk-guest.sh on the backup disk, serial
# sysdisk-backup, 3 GiB of ext4) makes a full and an incremental backup of
# its whole running disk and lists the files of each take; a rescue boot
# (the 9p guest, sysdisk-rescue.sh) restores the last point onto a blank
# disk of the same size and onto one 1.5 times larger and checks them;
# then both restored disks boot, and so does the point's qcow2 chain
# (copied out of the backup disk with debugfs) under a throwaway overlay.
#
# usage: run.sh test|soak|demo|bench|reboot|rootdisk|sysdisk [test name filters...]
#
# For `test`, prints one line per test and a final "N passed, N failed"; the
# run fails if a guest test fails, or if the guest's kernel log shows a BUG,
# WARNING, KASAN, lockdep, Oops, soft lockup, hung task or RCU stall report
# or kmemleak finds a leak. `soak` runs only the fuzzer, stress and fault
# injection tests, longer (see README.md), with the same checks.
#
# The variables BLKSNAP_FUZZ_* (SEED, CALLS, THREADS, SECONDS),
# BLKSNAP_STRESS_SECONDS and BLKSNAP_FAULTS_* set in the environment reach
# the guest tests, e.g. to replay a fuzzer run:
#   BLKSNAP_FUZZ_SEED=0x1234 tests/qemu/run.sh test fuzz_ioctls
# BLKSNAP_BENCH_* reach the benchmark (see tests/qemu/bench.sh), e.g. the
# unthrottled figures the throttling defaults come from:
#   BLKSNAP_BENCH_BPS=0 BLKSNAP_BENCH_IOPS=0 BLKSNAP_BENCH_CALIBRATE=1 tests/qemu/run.sh bench
set -euo pipefail

MODE=${1:?usage: run.sh test|soak|demo|bench|reboot|rootdisk|sysdisk [filters...]}
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blk-snap}
# BLKSNAP_FLAVOUR=bench (make bench): the bench kernel and the module built
# against it in target/bench-module.
if [ "${BLKSNAP_FLAVOUR:-debug}" = bench ]; then
	KOUT=${KBUILD_OUTPUT:-$(cat "$CACHE/kbuild-output-bench")}
	export BLKSNAP_KO=${BLKSNAP_KO:-$REPO/target/bench-module/blk_snap/blksnap.ko}
else
	KOUT=${KBUILD_OUTPUT:-$(cat "$CACHE/kbuild-output")}
	# Another module may be given, to run the tests against it.
	export BLKSNAP_KO=${BLKSNAP_KO:-$REPO/blk_snap/blksnap.ko}
fi
RESULTS=${RESULTS:-$REPO/results/$MODE}
if [ "$MODE" = soak ]; then
	TIMEOUT=${QEMU_TIMEOUT:-7200}
elif [ "$MODE" = bench ]; then
	TIMEOUT=${QEMU_TIMEOUT:-3600}
elif [ "$MODE" = sysdisk ]; then
	# Per boot: the live system's boot, with its full backup of 1 GiB
	# and two listings, takes about 8 minutes on a loaded host.
	TIMEOUT=${QEMU_TIMEOUT:-1500}
elif [ "$MODE" = reboot ] || [ "$MODE" = rootdisk ]; then
	# Per boot; a boot takes about a minute (rootdisk: see below).
	TIMEOUT=${QEMU_TIMEOUT:-600}
else
	# The whole guest suite takes 25-40 minutes under TCG (README); the
	# timeout is for a hang.
	TIMEOUT=${QEMU_TIMEOUT:-3600}
fi

if [ "$MODE" = bench ]; then
	# The throttling (each disk) makes the disk, not the emulated CPU, the
	# bottleneck. Unthrottled, the bench kernel (TCG, 2 vCPUs, libaio,
	# O_DIRECT) reached on the raw origin (BLKSNAP_BENCH_BPS=0
	# BLKSNAP_BENCH_IOPS=0 BLKSNAP_BENCH_CALIBRATE=1, 256 MiB):
	#   1 MiB sequential write QD8 1065 MB/s, read QD8 1198 MB/s;
	#   64 KiB random write QD8 8551 IOPS (560 MB/s), read QD8 7907 IOPS;
	#   4 KiB random write QD32 14416 IOPS.
	# Half of that would leave the snapshot paths CPU-bound: unthrottled,
	# first writes after a take reached only 90-620 MB/s (dm and ours),
	# our image reads 70-225 MB/s at 8-17 CPU s/GiB. So 200 MB/s (a fifth
	# of raw sequential; a copy-on-write moves each chunk twice on the
	# origin, so first writes get about 100 MB/s) and 2000 IOPS (a quarter
	# of 64 KiB random, 131 MB/s at 64 KiB; a seventh of 4 KiB random).
	export BLKSNAP_BENCH_BPS=${BLKSNAP_BENCH_BPS:-200000000}
	export BLKSNAP_BENCH_IOPS=${BLKSNAP_BENCH_IOPS:-2000}
	# MiB of the origin that each job goes over: 5 rounds in about 20 min.
	export BLKSNAP_BENCH_REGION=${BLKSNAP_BENCH_REGION:-96}
fi
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
# Settings for the guest tests: guest.sh reads them from this file.
export -p | grep -E '^declare -x BLKSNAP_((FUZZ|STRESS|FAULTS?|PRESSURE|BENCH|TEST)_[A-Z_]+|KO)=' >"$RESULTS/guest-env" || true
# The kernel command line of the virtme-ng boots. The host's root, shared
# over 9p, is mounted with cache=loose (virtme mounts it with no cache at
# all: every start of a program reads it over 9p again, seconds under TCG);
# the host does not change it during a run. BLKSNAP_9P_CACHE=none restores
# virtme's way.
KAPPEND="rootflags=version=9p2000.L,trans=virtio,access=any,msize=524288,cache=${BLKSNAP_9P_CACHE:-loose}"
KAPPEND+=" oops=panic panic=-1 softlockup_panic=0 hung_task_panic=0"
drive() { # file serial [extra drive options]
	echo "-drive file=$1,if=none,id=$2,format=raw,aio=threads,discard=unmap${3:-,cache=none}" \
		"-device virtio-blk-pci,drive=$2,serial=$2"
}

# The benchmark's disks, written in full (no holes: the first write of a
# round must not be a file system allocation on the host) and throttled.
bench_disks() {
	local region=$BLKSNAP_BENCH_REGION throttle=",cache=none" d
	local store=$((region + 32 > 96 ? region + 32 : 96))
	dd if=/dev/zero of="$RESULTS/disk-a.img" bs=1M count="$store" status=none
	dd if=/dev/urandom of="$RESULTS/disk-e.img" bs=1M count="$region" status=none
	for d in b c d; do
		dd if=/dev/urandom of="$RESULTS/disk-$d.img" bs=1M count=16 status=none
	done
	[ "$BLKSNAP_BENCH_BPS" = 0 ] || throttle+=",throttling.bps-total=$BLKSNAP_BENCH_BPS"
	[ "$BLKSNAP_BENCH_IOPS" = 0 ] || throttle+=",throttling.iops-total=$BLKSNAP_BENCH_IOPS"
	for d in a b c d e; do
		QEMU_DRIVES+="$(drive "$RESULTS/disk-$d.img" "blksnap-$d" "$throttle") "
	done
	# The incremental precision disk: 1 GiB, sparse, not throttled.
	truncate -s 1G "$RESULTS/disk-i.img"
	QEMU_DRIVES+="$(drive "$RESULTS/disk-i.img" blksnap-i ,cache=none) "
	bench_tools
	QEMU_DRIVES+="$(drive "$RESULTS/disk-t.img" blksnap-t ,cache=none,readonly=on) "
}

# The tools the benchmark starts often and every library they load (fio
# loads 64, 80 MB), as a tar archive on a disk of its own (serial
# blksnap-t), which bench.sh unpacks on tmpfs: read over 9p, a start of fio
# costs seconds, and so does copying them over 9p.
bench_tools() {
	local tools=("$REPO/target/release/blksnapctl") t dir=$RESULTS/tools
	for t in fio jq dmsetup; do tools+=("$(command -v "$t")"); done
	mkdir -p "$dir/bin" "$dir/lib"
	cp "${tools[@]}" "$dir/bin/"
	ldd "${tools[@]}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u |
		xargs cp -L -t "$dir/lib/"
	tar -cf "$RESULTS/disk-t.img" -C "$dir" bin lib
	rm -rf "$dir"
}

# The harness checks of one boot's console log, reported like tests and
# counted in passed/failed. A boot's own ok/FAIL lines are counted by the
# caller.
report() { # name ok|reason
	if [ "$2" = ok ]; then
		passed=$((passed + 1))
		echo "ok $1"
	else
		failed=$((failed + 1))
		echo "FAIL $1: $2"
	fi
}
check_debug_kernel() { # name log
	if grep -q 'KernelAddressSanitizer initialized' "$2" &&
		grep -q 'Lock dependency validator' "$2"; then
		report "$1" ok
		grep -m1 'Linux version' "$2" | sed 's/^/    | /'
		grep -m1 'KernelAddressSanitizer initialized' "$2" | sed 's/^/    | /'
	else
		report "$1" "no KASAN/lockdep banner in the guest log"
	fi
}
check_splats() { # name log
	# The kernel command line (hung_task_panic=0) is no report.
	local splats
	splats=$(grep -E 'BUG:|WARNING:|KASAN:|Oops|possible circular locking|possible recursive locking|inconsistent lock state|INFO: task .* blocked|Kernel panic|general protection fault|UBSAN:|soft lockup|hung_task|blocked for more than|rcu_sched self-detected stall|self-detected stall|rcu: INFO' \
		"$2" | grep -v '^FAIL ' | grep -v '^    |' | grep -vi 'command line:' || true)
	if [ -z "$splats" ]; then
		report "$1" ok
	else
		report "$1" "$(echo "$splats" | head -1)"
		echo "$splats" | head -20 | sed 's/^/    | /'
	fi
}
check_kmemleak() { # name file
	if [ ! -f "$2" ]; then
		report "$1" "no kmemleak report (guest did not finish)"
	elif grep -q 'unreferenced object' "$2"; then
		report "$1" "$(grep -c 'unreferenced object' "$2") leaks, see $2"
		head -30 "$2" | sed 's/^/    | /'
	else
		report "$1" ok
	fi
}

if [ "$MODE" = rootdisk ]; then
	start=$(date +%s)
	mapfile -t made < <("$REPO/tests/qemu/rootdisk-image.sh")
	IMG=${made[0]} INITRD=${made[1]}
	echo "qemu: system disk $IMG, initramfs $INITRD (ready after $(($(date +%s) - start)) s)"
	# The cached image stays as it is: the guest writes to an overlay. Its
	# base and the initramfs are linked (or copied) here first: another
	# run's rootdisk-image.sh may replace the cached ones between boots.
	ln -f "$IMG" "$RESULTS/root-base.img" 2>/dev/null || cp --sparse=always "$IMG" "$RESULTS/root-base.img"
	cp "$INITRD" "$RESULTS/initrd.img"
	INITRD=$RESULTS/initrd.img
	qemu-img create -q -f qcow2 -F raw -b "$RESULTS/root-base.img" "$RESULTS/disk-root.qcow2"
	truncate -s 16M "$RESULTS/disk-state.img"
	mkdir -p "$RESULTS/backup-files"
	cp "$REPO/tests/qemu/rootdisk-guest.sh" "$RESULTS/backup-files/"
	truncate -s 3G "$RESULTS/disk-backup.img"
	# Initialized now: no lazy init writing in the guest.
	mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$RESULTS/backup-files" \
		"$RESULTS/disk-backup.img"
	root_drive="-drive file=$RESULTS/disk-root.qcow2,if=none,id=blksnap-root,format=qcow2,aio=threads,discard=unmap,cache=none"
	root_drive+=" -device virtio-blk-pci,drive=blksnap-root,serial=blksnap-root"
	QEMU_DRIVES="$root_drive $(drive "$RESULTS/disk-state.img" blksnap-state)"
	QEMU_DRIVES+=" $(drive "$RESULTS/disk-backup.img" blksnap-backup)"
	passed=0 failed=0
	# The first line of $2 matching the extended regex $3 (its number), or
	# 0; the guest's lines end with a carriage return.
	line_of() { # log regex
		grep -nE -m1 "$2" "$1" | cut -d: -f1 | grep . || echo 0
	}
	# The line matching $3 comes before the root file system is mounted.
	before_mount() { # name log regex what
		local at mounted
		at=$(line_of "$2" "$3")
		mounted=$(line_of "$2" 'EXT4-fs \(vda2\): mounted filesystem')
		if [ "$at" = 0 ]; then
			report "$1" "no line '$3' on the console ($4)"
		elif [ "$mounted" = 0 ] || [ "$at" -gt "$mounted" ]; then
			report "$1" "'$3' (line $at) is not before the root file system's mount (line $mounted)"
		else
			report "$1" ok
			echo "    | $(sed -n "${at}p" "$2")"
			echo "    | $(sed -n "${mounted}p" "$2")"
		fi
	}
	echo "qemu: booting $(cat "$KOUT/include/config/kernel.release") (rootdisk: 3 boots of a Debian system on a virtio disk), results in $RESULTS"
	for n in 1 2 3; do
		log=$RESULTS/console-$n.log
		append="root=/dev/vda2 ro console=ttyS0 rootdisk.phase=boot$n"
		append+=" oops=panic panic=-1 softlockup_panic=0 hung_task_panic=0"
		# Boot 3: nothing attaches the root disk until the guest's script.
		[ $n = 3 ] && append+=" rd.blksnap=0 systemd.mask=blksnap-cbt.service"
		echo "qemu: boot $n: $append"
		start=$(date +%s)
		set +e
		# shellcheck disable=SC2086 # QEMU_DRIVES is a list of options
		# q35 and -cpu max as virtme-ng has them under TCG: on the default
		# i440fx machine each virtio disk's probe went through ACPI's PCI
		# routing, so slow under KASAN that it raised soft lockup reports.
		timeout --foreground "$TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu max,la57=off -smp 2 -m 1G \
			-nographic -monitor none -no-reboot \
			-kernel "$KOUT/arch/x86/boot/bzImage" -initrd "$INITRD" -append "$append" \
			$QEMU_DRIVES </dev/null 2>&1 | sed -u 's/\r//g' | tee "$log" |
			grep --line-buffered -E '^(ok |FAIL |    [^ ]|rootdisk-guest:|/dev/disk/by-id/|state device |saved the CBT|blksnapctl:)'
		status=${PIPESTATUS[0]}
		set -e
		echo "qemu: boot $n ended after $(($(date +%s) - start)) s (exit status $status)"
		passed=$((passed + $(grep -c '^ok ' "$log" || true)))
		failed=$((failed + $(grep -c '^FAIL ' "$log" || true)))
		if ! grep -qE "^(ok|FAIL) rootdisk_boot${n}_" "$log"; then
			report "boot${n}_phase_ran" "the guest ran no test of boot $n"
		fi
		check_debug_kernel "boot${n}_debug_kernel" "$log"
		check_splats "boot${n}_kernel_log_clean" "$log"
		case $n in
		1)
			# The state device has no header yet: attached, not persisted.
			before_mount boot1_initramfs_attached_the_root_disk "$log" \
				'^/dev/disk/by-id/virtio-blksnap-root: tracking \(no state device open' \
				"the initramfs's cbt boot"
			;;
		2)
			before_mount boot2_initramfs_opened_the_state_device "$log" \
				'^state device /dev/disk/by-id/virtio-blksnap-state: 1 saved device states, clean' \
				"the initramfs's cbt boot"
			before_mount boot2_initramfs_restored_the_root_disk "$log" \
				'^/dev/disk/by-id/virtio-blksnap-root: CBT restored \(generation ' \
				"the initramfs's cbt boot"
			# blksnap-cbt.service's cbt boot after switch_root: the same
			# answer, not a second verdict.
			restored=$(grep -cE '(^|blksnapctl\[[0-9]+\]: )/dev/disk/by-id/virtio-blksnap-root: CBT restored \(generation ' "$log" || true)
			if [ "$restored" -ge 2 ] && ! grep -q '/dev/disk/by-id/virtio-blksnap-root: saved CBT not used' "$log"; then
				report boot2_boot_unit_answers_the_same ok
			else
				report boot2_boot_unit_answers_the_same "$restored lines 'CBT restored' (the initramfs's and the unit's expected), or a refusal"
			fi
			;;
		3)
			if [ "$(line_of "$log" '^/dev/disk/by-id/virtio-blksnap-root: ')" = 0 ] &&
				[ "$(line_of "$log" 'rd.blksnap=0: no CBT attached in the initramfs')" != 0 ]; then
				report boot3_initramfs_skipped ok
			else
				report boot3_initramfs_skipped "the initramfs did not say it skipped, or ran cbt boot"
			fi
			;;
		esac
		# systemd-shutdown's hook saves once every file system is unmounted
		# or read-only, after the guest's test (the kernel says so).
		done_at=$(line_of "$log" "^rootdisk-guest: boot$n done")
		final_at=$(line_of "$log" 'systemd-shutdown\[1\]: All filesystems')
		saved_at=$( (grep -nE 'blksnap: CBT state of 1 devices saved on ' "$log" || true) | tail -1 | cut -d: -f1)
		if [ "$done_at" != 0 ] && [ "$final_at" -gt "$done_at" ] && [ "${saved_at:-0}" -gt "$final_at" ]; then
			report "boot${n}_shutdown_hook_saved_the_cbt" ok
			echo "    | $(sed -n "${saved_at}p" "$log")"
		else
			report "boot${n}_shutdown_hook_saved_the_cbt" "no 'CBT state of 1 devices saved' after systemd-shutdown unmounted the file systems"
		fi
		# systemd breaks an ordering cycle by dropping a job of the boot.
		cycle=$(grep -a -m1 -E 'Found ordering cycle|deleted to break ordering cycle' "$log" || true)
		if [ -z "$cycle" ]; then
			report "boot${n}_no_ordering_cycle" ok
		else
			report "boot${n}_no_ordering_cycle" "systemd: ${cycle#*systemd\[1\]: }"
		fi
		if grep -q "^rootdisk-guest: boot$n done" "$log" && [ "$status" = 0 ]; then
			report "boot${n}_guest_completed" ok
		else
			report "boot${n}_guest_completed" "the guest did not finish and power off (QEMU status $status)"
		fi
	done
	echo "$passed passed, $failed failed"
	[ "$failed" = 0 ]
	exit
fi

if [ "$MODE" = sysdisk ]; then
	start_all=$(date +%s)
	IMG=$("$REPO/tests/qemu/sysdisk-image.sh")
	echo "qemu: system disk $IMG (ready after $(($(date +%s) - start_all)) s)"
	# The cached image stays as it is: the live system writes to an
	# overlay of a link (or copy) of it.
	ln -f "$IMG" "$RESULTS/sys-base.img" 2>/dev/null || cp --sparse=always "$IMG" "$RESULTS/sys-base.img"
	qemu-img create -q -f qcow2 -F raw -b "$RESULTS/sys-base.img" "$RESULTS/disk-sys.qcow2"
	sys_bytes=$(stat -c %s "$RESULTS/sys-base.img")
	truncate -s 16M "$RESULTS/disk-state.img"
	mkdir -p "$RESULTS/backup-files"
	cp "$REPO/tests/qemu/sysdisk-guest.sh" "$RESULTS/backup-files/"
	truncate -s 3G "$RESULTS/disk-backup.img"
	# Initialized now: no lazy init writing in the guest.
	mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$RESULTS/backup-files" \
		"$RESULTS/disk-backup.img"
	passed=0 failed=0
	# A disk SeaBIOS boots from (the first in the boot order).
	boot_drive() { # file format serial
		echo "-drive file=$1,if=none,id=$3,format=$2,aio=threads,discard=unmap,cache=none" \
			"-device virtio-blk-pci,drive=$3,serial=$3,bootindex=0"
	}
	# A boot of a system disk by SeaBIOS and its GRUB: the guest's script
	# runs and powers off. Its console in $RESULTS/console-TAG.log.
	sys_boot() { # tag serial drives...
		local tag=$1 serial=$2 log=$RESULTS/console-$1.log start status
		shift 2
		echo "qemu: boot $tag (virtio-$serial)"
		start=$(date +%s)
		set +e
		# shellcheck disable=SC2068 # the drive options, split
		timeout --foreground "$TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu max,la57=off -smp 2 -m 1G \
			-nographic -monitor none -no-reboot $@ </dev/null 2>&1 | sed -u 's/\r//g' | tee "$log" |
			grep --line-buffered -E '^(ok |FAIL |    [^ ]|      [^ ]|sysdisk-guest:|GRUB:)'
		status=${PIPESTATUS[0]}
		set -e
		echo "$(($(date +%s) - start))" >"$RESULTS/boot-$tag.time"
		echo "qemu: boot $tag ended after $(($(date +%s) - start)) s (exit status $status)"
		passed=$((passed + $(grep -c '^ok ' "$log" || true)))
		failed=$((failed + $(grep -c '^FAIL ' "$log" || true)))
		if grep -q '^GRUB: booting' "$log"; then
			report "${tag}_grub_booted_the_disk" ok
		else
			report "${tag}_grub_booted_the_disk" "no 'GRUB: booting' on the console"
		fi
		check_debug_kernel "${tag}_debug_kernel" "$log"
		check_splats "${tag}_kernel_log_clean" "$log"
		if grep -q "^sysdisk-guest: $serial done" "$log" && [ "$status" = 0 ]; then
			report "${tag}_guest_completed" ok
		else
			report "${tag}_guest_completed" "the guest did not finish and power off (QEMU status $status)"
		fi
	}
	# A file of the backup disk (ext4, written by the live system).
	backup_file() { debugfs -R "cat $1" "$RESULTS/disk-backup.img" 2>/dev/null; }
	echo "qemu: booting $(cat "$KOUT/include/config/kernel.release") (sysdisk: the live system, a rescue boot, three boots of restored disks), results in $RESULTS"

	# 1. The live system: full and incremental backups of its running
	# system disk into points on the backup disk.
	# shellcheck disable=SC2046 # the drive options, split
	sys_boot live sysdisk $(boot_drive "$RESULTS/disk-sys.qcow2" qcow2 sysdisk) \
		$(drive "$RESULTS/disk-state.img" sysdisk-state) $(drive "$RESULTS/disk-backup.img" sysdisk-backup)

	# 2. The rescue boot (the 9p test guest): the last point restored onto
	# a blank disk of the same size and onto one 1.5 times larger.
	truncate -s "$sys_bytes" "$RESULTS/disk-restore-a.img"
	truncate -s $((sys_bytes * 3 / 2)) "$RESULTS/disk-restore-b.img"
	log=$RESULTS/console-rescue.log
	echo "qemu: rescue boot"
	start=$(date +%s)
	set +e
	timeout --foreground "$TIMEOUT" vng --run "$KOUT" --disable-kvm --disable-microvm --force-9p \
		--cpus 2 --memory 1G --verbose \
		--append "$KAPPEND" \
		--rwdir "$RESULTS" \
		--exec "$REPO/tests/qemu/sysdisk-rescue.sh $RESULTS $REPO" \
		--qemu-opts="$(drive "$RESULTS/disk-backup.img" sysdisk-backup) $(drive "$RESULTS/disk-restore-a.img" sysdisk-restore-a) $(drive "$RESULTS/disk-restore-b.img" sysdisk-restore-b)" 2>&1 |
		tee "$log" | grep --line-buffered -E '^(ok |FAIL |    |guest:)'
	status=${PIPESTATUS[0]}
	set -e
	echo "$(($(date +%s) - start))" >"$RESULTS/boot-rescue.time"
	echo "qemu: rescue boot ended after $(($(date +%s) - start)) s (exit status $status)"
	passed=$((passed + $(grep -c '^ok ' "$log" || true)))
	failed=$((failed + $(grep -c '^FAIL ' "$log" || true)))
	check_debug_kernel rescue_debug_kernel "$log"
	check_splats rescue_kernel_log_clean "$log"
	if grep -q '^guest-exit 0$' "$log"; then
		report rescue_guest_completed ok
	else
		report rescue_guest_completed "the rescue guest did not finish (vng status $status)"
	fi

	# The disk the restored systems mount at /backup: the guest's script
	# and the take's listings, copied out of the backup disk.
	rm -rf "$RESULTS/check-files"
	mkdir -p "$RESULTS/check-files"
	cp "$REPO/tests/qemu/sysdisk-guest.sh" "$RESULTS/check-files/"
	debugfs -R "rdump /lists $RESULTS/check-files" "$RESULTS/disk-backup.img" 2>/dev/null
	check_disk() {
		truncate -s 0 "$RESULTS/disk-check.img"
		truncate -s 64M "$RESULTS/disk-check.img"
		mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$RESULTS/check-files" \
			"$RESULTS/disk-check.img"
		drive "$RESULTS/disk-check.img" sysdisk-backup
	}

	# 3. The restored disks booted, as on bare metal: BIOS, GRUB, kernel
	# and initramfs of the disk.
	# shellcheck disable=SC2046 # the drive options, split
	sys_boot restored sysdisk-restored $(boot_drive "$RESULTS/disk-restore-a.img" raw sysdisk-restored) $(check_disk)
	# shellcheck disable=SC2046 # the drive options, split
	sys_boot restored_big sysdisk-restored-big $(boot_drive "$RESULTS/disk-restore-b.img" raw sysdisk-restored-big) $(check_disk)

	# 4. Instant recovery: the point's qcow2 chain, copied out of the
	# backup disk as it is, booted through a throwaway overlay.
	rm -rf "$RESULTS/instant"
	mkdir -p "$RESULTS/instant"
	debugfs -R "rdump /points $RESULTS/instant" "$RESULTS/disk-backup.img" 2>/dev/null
	last=$(find "$RESULTS/instant/points/vda" -name 'point-*.qcow2' 2>/dev/null | sort | tail -1 || true)
	if [ -n "$last" ] && qemu-img create -q -f qcow2 -b "$last" -F qcow2 "$RESULTS/instant/overlay.qcow2"; then
		echo "qemu: instant recovery: $(qemu-img info --backing-chain "$RESULTS/instant/overlay.qcow2" | grep -E '^image:' | tr '\n' ' ')"
		# shellcheck disable=SC2046 # the drive options, split
		sys_boot instant sysdisk-instant $(boot_drive "$RESULTS/instant/overlay.qcow2" qcow2 sysdisk-instant) $(check_disk)
	else
		report instant_recovery "no point on the backup disk to boot"
	fi

	# The numbers.
	echo "qemu: numbers"
	set +e
	for n in 1 2; do
		m=$(backup_file "/points/vda/point-000$n.json")
		echo "    point $n: $(jq -r .kind <<<"$m") ($(jq -r .method <<<"$m")) backup of the running $((sys_bytes >> 20)) MiB system disk in $(backup_file "/time-$n") s: read $(jq -r .bytes_read <<<"$m") bytes, wrote $(jq -r .bytes_written <<<"$m")"
	done
	echo "    between the takes: the workload wrote $(backup_file /workload-bytes) bytes (the writer more), $(backup_file /changed-blocks) blocks of 64 KiB differ"
	echo "    restore of the last point: $(cat "$RESULTS/restore-same.time" 2>/dev/null) s onto a disk of the same size, $(cat "$RESULTS/restore-big.time" 2>/dev/null) s onto one 1.5 times larger"
	for t in live rescue restored restored_big instant; do
		echo "    boot $t: $(cat "$RESULTS/boot-$t.time" 2>/dev/null) s"
	done
	echo "    the restored disk's console:"
	grep -E '^GRUB:|Linux version|blksnap|EXT4-fs \(dm-0\)|XFS \(dm-1\)|fsck|Reached target.*(Local File|Multi-User)|sysdisk-guest:' \
		"$RESULTS/console-restored.log" | grep -v '^    ' | head -30 | sed 's/^/    | /'
	set -e
	echo "qemu: sysdisk took $(($(date +%s) - start_all)) s"
	echo "$passed passed, $failed failed"
	[ "$failed" = 0 ]
	exit
fi

if [ "$MODE" = reboot ]; then
	# The tracked disks (see tests/qemu/guest/src/reboot.rs): serial rb-ROLE,
	# in this order (the guest names them vda, vdb, ... in it: their CBT ids
	# are those slots); ext4 made here, the raw ones filled by boot 1.
	RB_EXT4="ctl host early swapa swapb stale"
	RB_ROLES="$RB_EXT4 raw rawok seal q r"
	for r in $RB_ROLES; do
		case $r in
		q | r) truncate -s 8M "$RESULTS/disk-rb-$r.img" ;;
		*) truncate -s 32M "$RESULTS/disk-rb-$r.img" ;;
		esac
	done
	for r in $RB_EXT4; do
		mkfs.ext4 -q -F -L "rb-$r" -E lazy_itable_init=0,lazy_journal_init=0 "$RESULTS/disk-rb-$r.img"
	done
	truncate -s 16M "$RESULTS/disk-s.img"
	truncate -s 16M "$RESULTS/disk-m.img"
	truncate -s 256M "$RESULTS/disk-k.img"
	# Initialized now: no lazy init writing in the guest.
	mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$RESULTS/disk-k.img"
	mkdir -p "$RESULTS/backups"
	# The drives of a boot; in boot 2 and later, swapa and swapb have
	# swapped slots (each keeps its serial: a disk moved to another slot).
	rb_drives() { # boot
		local r order=$RB_ROLES
		[ "$1" -ge 2 ] && order=${order/swapa swapb/swapb swapa}
		QEMU_DRIVES=
		for r in $order; do
			QEMU_DRIVES+="$(drive "$RESULTS/disk-rb-$r.img" "rb-$r") "
		done
		QEMU_DRIVES+="$(drive "$RESULTS/disk-s.img" blksnap-s) $(drive "$RESULTS/disk-m.img" blksnap-m)"
		QEMU_DRIVES+=" $(drive "$RESULTS/disk-k.img" blksnap-k)"
	}
	passed=0 failed=0
	# Boot 2's power cut, in the background: waits for the marker, then
	# for the writer's progress after it (writes still going on), samples
	# the bytes QEMU writes over half a second, and kills QEMU. Writes
	# "key value" lines to $RESULTS/power-cut.txt.
	power_cut() { # log pidfile
		local log=$1 pidfile=$2 out=$RESULTS/power-cut.txt at last pid w0 w1
		local re='^    (power-cut-now|power cut pending): writer at'
		until grep -q '^    power-cut-now: writer at' "$log" 2>/dev/null; do sleep 0.2; done
		at=$(grep -m1 '^    power-cut-now: writer at' "$log" | awk '{print $4}')
		last=$at
		for _ in $(seq 100); do
			last=$(grep -E "$re" "$log" | tail -1 | awk '{print $(NF-1)}')
			[ "${last:-0}" -gt "${at:-0}" ] && break
			sleep 0.1
		done
		pid=$(cat "$pidfile" 2>/dev/null || true)
		w0=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io" 2>/dev/null || true)
		sleep 0.5
		w1=$(awk '/^wchar:/ {print $2}' "/proc/$pid/io" 2>/dev/null || true)
		kill -9 "$pid" || true
		printf 'marker %s\nbefore_kill %s\nqemu_pid %s\nwchar_half_s %s\n' \
			"${at:-0}" "${last:-0}" "${pid:-none}" $((${w1:-0} - ${w0:-0})) >"$out"
	}
	echo "qemu: booting $(cat "$KOUT/include/config/kernel.release") (reboot: 3 boots over the same disks), results in $RESULTS"
	for n in 1 2 3; do
		log=$RESULTS/console-$n.log
		pidfile=$RESULTS/qemu-$n.pid
		echo "qemu: boot $n"
		cutter=
		if [ $n = 2 ]; then
			power_cut "$log" "$pidfile" &
			cutter=$!
			# A saved state of another size: boot 2 must refuse it.
			truncate -s 12M "$RESULTS/disk-rb-r.img"
			# Another system writes a file into host's file system while
			# the module cannot see it (an edit of a VM's disk image).
			echo "written by the host between boots 1 and 2" >"$RESULTS/host-file.txt"
			debugfs -w -R "write $RESULTS/host-file.txt host-file" "$RESULTS/disk-rb-host.img" >/dev/null 2>&1 ||
				echo "qemu: FAIL: debugfs could not write into disk-rb-host.img"
		fi
		rb_drives $n
		start=$(date +%s)
		set +e
		# 1 GiB (not 2): the two kmemleak scans of each boot take half as
		# long, and nothing here needs more.
		timeout --foreground "$TIMEOUT" vng --run "$KOUT" --disable-kvm --disable-microvm --force-9p \
			--cpus 2 --memory 1G --verbose \
			--append "$KAPPEND" \
			--rwdir "$RESULTS" \
			--exec "$REPO/tests/qemu/guest.sh reboot $RESULTS $REPO boot$n" \
			--qemu-opts="$QEMU_DRIVES -pidfile $pidfile" 2>&1 |
			tee "$log" |
			grep --line-buffered -E '^(ok |FAIL |--- |    |[0-9]+ passed|guest:)'
		vng_status=${PIPESTATUS[0]}
		set -e
		echo "qemu: boot $n ended after $(($(date +%s) - start)) s (exit status $vng_status)"
		passed=$((passed + $(grep -c '^ok ' "$log" || true)))
		failed=$((failed + $(grep -c '^FAIL ' "$log" || true)))
		if ! grep -qE "^(ok|FAIL) reboot_boot${n}_" "$log"; then
			report "boot${n}_phase_ran" "the guest ran no test of boot $n"
		fi
		check_debug_kernel "boot${n}_debug_kernel" "$log"
		check_splats "boot${n}_kernel_log_clean" "$log"
		check_kmemleak "boot${n}_no_memory_leaks" "$RESULTS/kmemleak-boot$n.txt"
		if [ $n = 2 ]; then
			if [ -f "$RESULTS/power-cut.txt" ]; then
				wait "$cutter" || true
				# shellcheck disable=SC2046
				set -- $(awk '{print $2}' "$RESULTS/power-cut.txt")
				if grep -q '^guest-exit' "$log"; then
					report boot2_power_cut_mid_write "the guest finished before the kill"
				elif [ "$4" -lt 16384 ]; then
					report boot2_power_cut_mid_write "QEMU wrote only $4 bytes in the half second before the kill: no writes in flight"
				else
					report boot2_power_cut_mid_write ok
					echo "    | marker at $1 blocks written, $2 at the kill; QEMU (pid $3) wrote $4 bytes in the last half second"
				fi
			else
				kill "$cutter" 2>/dev/null || true
				wait "$cutter" 2>/dev/null || true
				report boot2_power_cut_mid_write "no power cut: the guest never printed the marker"
			fi
		else
			if [ $n = 3 ] && ! grep -qE '^(ok|FAIL) module_unloaded' "$log"; then
				report boot3_module_unloaded "the guest never reached the final rmmod"
			fi
			if grep -q '^guest-exit 0$' "$log"; then
				report "boot${n}_guest_completed" ok
			else
				report "boot${n}_guest_completed" "guest did not finish cleanly (vng status $vng_status)"
			fi
		fi
	done
	echo "$passed passed, $failed failed"
	[ "$failed" = 0 ]
	exit
fi

# The PostgreSQL cluster of the app_postgresql test, on disk-h.img: made
# here, where initdb and pgbench -i take seconds (under TCG in the guest,
# 90 s). The guest test adds its settings, starts it and loads it. Without
# PostgreSQL 15 (scripts/deps.sh installs it) the disk stays empty and that
# test fails saying so.
pg_cluster() { # image
	local bin=/usr/lib/postgresql/15/bin d=$RESULTS/pg-cluster pgu
	if [ ! -x "$bin/initdb" ] || ! pgu=$(id -u postgres 2>/dev/null); then
		echo "qemu: no PostgreSQL 15 on the host: disk-h.img stays empty"
		return
	fi
	rm -rf "$d"
	mkdir -p "$d/root/pgdata" "$d/sock" "$d/log"
	chown postgres "$d/root/pgdata" "$d/sock" "$d/log"
	as_pg() { setpriv --reuid="$pgu" --regid="$(id -g postgres)" --init-groups -- "$@"; }
	if (cd / && as_pg "$bin/initdb" -D "$d/root/pgdata" --data-checksums --wal-segsize=1 --no-locale \
		-E UTF8 -A trust -U postgres --no-instructions >"$d/log/initdb.log" 2>&1 &&
		as_pg "$bin/pg_ctl" -D "$d/root/pgdata" -l "$d/log/server.log" -w \
			-o "-k $d/sock -c listen_addresses=" start >/dev/null &&
		"$bin/pgbench" -h "$d/sock" -U postgres -i -s 1 -q postgres >"$d/log/pgbench.log" 2>&1 &&
		"$bin/psql" -X -q -h "$d/sock" -U postgres -c 'CREATE EXTENSION amcheck' postgres &&
		as_pg "$bin/pg_ctl" -D "$d/root/pgdata" -m fast -w stop >/dev/null); then
		mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -d "$d/root" "$1"
	else
		cat "$d"/log/*.log
		echo "qemu: the PostgreSQL cluster for disk-h.img failed"
		as_pg "$bin/pg_ctl" -D "$d/root/pgdata" -m immediate -w stop >/dev/null 2>&1
	fi
	rm -rf "$d"
}

# The PostgreSQL programs of the app_postgresql test and every library
# they load, as a tar archive on a disk of its own (serial blksnap-p) that
# the test unpacks on tmpfs: read over 9p, each start of psql or the server
# costs seconds under load, and copying them over 9p (60 MiB) took 68 s.
# The layout is the installation's (usr/lib/postgresql/15/{bin,lib}, the
# server finds its lib and share directories from its own path), the
# libraries in libs/ (for LD_LIBRARY_PATH); what is not copied (the other
# extensions, the share directory, ICU's 30 MiB of data) is linked to the
# host's, which the guest sees at the same paths.
pg_tools() { # image
	local pg=/usr/lib/postgresql/15 d=$RESULTS/pg-tools p f progs=()
	rm -rf "$d"
	if [ ! -x "$pg/bin/postgres" ]; then
		echo "qemu: no PostgreSQL 15 on the host: no tools archive"
		tar -cf "$1" -T /dev/null
		return
	fi
	mkdir -p "$d$pg/bin" "$d$pg/lib" "$d/usr/share/postgresql" "$d/libs"
	ln -s /usr/share/postgresql/15 "$d/usr/share/postgresql/15"
	for f in "$pg"/lib/*; do
		ln -s "$f" "$d$pg/lib/"
	done
	rm "$d$pg/lib/amcheck.so" && cp "$pg/lib/amcheck.so" "$d$pg/lib/"
	for p in postgres pg_ctl psql pgbench pg_amcheck pg_isready pg_checksums pg_controldata; do
		progs+=("$pg/bin/$p")
	done
	cp "${progs[@]}" "$d$pg/bin/"
	ldd "${progs[@]}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u |
		while read -r f; do
			if [ "$(stat -L -c %s "$f")" -gt $((16 << 20)) ]; then
				ln -s "$f" "$d/libs/"
			else
				cp -L "$f" "$d/libs/"
			fi
		done
	tar -cf "$1" -C "$d" usr libs
	rm -rf "$d"
}

QEMU_DRIVES=
if [ "$MODE" = bench ]; then
	bench_disks
else
	truncate -s 256M "$RESULTS/disk-a.img"
	truncate -s 256M "$RESULTS/disk-b.img"
	truncate -s 64M "$RESULTS/disk-c.img"
	truncate -s 64M "$RESULTS/disk-d.img"
	truncate -s 400M "$RESULTS/disk-e.img"
	truncate -s $((131073 * 512)) "$RESULTS/disk-f.img"
	truncate -s 64M "$RESULTS/disk-g.img"
	truncate -s 128M "$RESULTS/disk-h.img"
	pg_cluster "$RESULTS/disk-h.img"
	pg_tools "$RESULTS/disk-p.img"
	printf 'label: dos\nstart=2048, size=65536, type=83\nstart=67600, type=83\n' |
		sfdisk --quiet "$RESULTS/disk-b.img" >/dev/null
	for d in a b c d e; do
		QEMU_DRIVES+="$(drive "$RESULTS/disk-$d.img" "blksnap-$d") "
	done
	QEMU_DRIVES+="$(drive "$RESULTS/disk-f.img" blksnap-f ,cache=writeback) "
	QEMU_DRIVES+="$(drive "$RESULTS/disk-g.img" blksnap-g ,cache=none,throttling.bps-write=65536) "
	QEMU_DRIVES+="$(drive "$RESULTS/disk-h.img" blksnap-h) "
	QEMU_DRIVES+="$(drive "$RESULTS/disk-p.img" blksnap-p ,cache=none,readonly=on) "
fi

echo "qemu: booting $(cat "$KOUT/include/config/kernel.release") ($MODE), results in $RESULTS"
start=$(date +%s)
set +e
timeout --foreground "$TIMEOUT" vng --run "$KOUT" --disable-kvm --disable-microvm --force-9p \
	--cpus 2 --memory 2G --verbose \
	--append "$KAPPEND" \
	--qemu-opts="$QEMU_DRIVES" \
	--rwdir "$RESULTS" \
	--exec "$REPO/tests/qemu/guest.sh $MODE $RESULTS $REPO $*" 2>&1 |
	tee "$RESULTS/console.log" |
	grep --line-buffered -E '^(ok |FAIL |--- |    |[0-9]+ passed|demo|bench|\$ |guest:)' | sed -u 's/^demo: //'
vng_status=${PIPESTATUS[0]}
set -e
echo "qemu: guest finished in $(($(date +%s) - start)) s (exit status $vng_status)"

if [ "$MODE" != test ] && [ "$MODE" != soak ]; then
	# demo and bench: the guest must finish cleanly and unload the module
	# (guest.sh prints "FAIL module_unloaded: ..." otherwise).
	if grep -q '^FAIL module_unloaded' "$RESULTS/console.log"; then
		echo "qemu: FAIL: the blksnap module could not be unloaded at the end"
		exit 1
	elif ! grep -q '^guest-exit 0$' "$RESULTS/console.log"; then
		echo "qemu: FAIL: the guest did not report success (no \"guest-exit 0\"; vng status $vng_status)"
		[ "$vng_status" != 0 ] && exit "$vng_status"
		exit 1
	fi
	exit "$vng_status"
fi

# Harness checks, reported like tests.
passed=$(grep -c '^ok ' "$RESULTS/console.log" || true)
failed=$(grep -c '^FAIL ' "$RESULTS/console.log" || true)

check_debug_kernel debug_kernel "$RESULTS/console.log"
check_splats kernel_log_clean "$RESULTS/console.log"
check_kmemleak no_memory_leaks "$RESULTS/kmemleak.txt"

# guest.sh reports the final unload as ok/FAIL module_unloaded, counted
# above; without either line it never got there.
if ! grep -qE '^(ok|FAIL) module_unloaded' "$RESULTS/console.log"; then
	report module_unloaded "the guest never reached the final rmmod"
fi

if grep -q '^guest-exit 0$' "$RESULTS/console.log"; then
	report guest_completed ok
else
	report guest_completed "guest did not finish cleanly (vng status $vng_status)"
fi

# The slowest tests of the run, for the suite's time budget (README).
echo "slowest tests:"
sed -nE 's/^(ok|FAIL) ([A-Za-z0-9_]+).* \(([0-9.]+)s\)$/\3 \2/p' "$RESULTS/console.log" |
	sort -rn | head -10 | awk '{ printf "  %7.1f s  %s\n", $1, $2 }'
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
