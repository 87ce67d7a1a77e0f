#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Boots the debug test kernel under QEMU (TCG, 2 vCPUs) with virtme-ng, the
# host's root filesystem shared read-only, and five virtio disks:
#   serial blksnap-a: 256 MiB, no partition table;
#   serial blksnap-b: 256 MiB, MBR with partitions at sectors 2048 and 67600;
#   serial blksnap-c, blksnap-d: 64 MiB each, for snapshots;
#   serial blksnap-e: 400 MiB, for file systems;
#   serial blksnap-f: 131073 sectors (64 MiB + 512 bytes), an odd size that
#     is not a multiple of 4 KiB (QEMU needs cache=writeback for it);
#   serial blksnap-g: 64 MiB whose writes QEMU throttles to 64 KiB/s, so that
#     a write stays in flight for seconds (the first write passes at once:
#     issue a sacrificial one first).
# In bench mode the disks are instead (see bench_disks below): blksnap-e, the
# origin, BLKSNAP_BENCH_REGION MiB of random data; blksnap-a, the store disk
# (zeros), the region plus 32 MiB, at least 96 MiB; blksnap-b, -c, -d, 16
# MiB of random data each; all five throttled to BLKSNAP_BENCH_BPS bytes/s
# and BLKSNAP_BENCH_IOPS I/Os per second (each; 0: not throttled); and
# blksnap-i, 1 GiB, sparse and not throttled, for the incremental precision
# line; blksnap-t, read-only, a tar archive of the tools bench.sh starts often.
# Then runs tests/qemu/guest.sh MODE in the guest.
#
# usage: run.sh test|soak|demo|bench [test name filters...]
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

MODE=${1:?usage: run.sh test|soak|demo|bench [filters...]}
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
	export BLKSNAP_KO=$REPO/blk_snap/blksnap.ko
fi
RESULTS=${RESULTS:-$REPO/results/$MODE}
if [ "$MODE" = soak ]; then
	TIMEOUT=${QEMU_TIMEOUT:-7200}
elif [ "$MODE" = bench ]; then
	TIMEOUT=${QEMU_TIMEOUT:-3600}
else
	TIMEOUT=${QEMU_TIMEOUT:-1800}
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
export -p | grep -E '^declare -x BLKSNAP_((FUZZ|STRESS|FAULTS|PRESSURE|BENCH)_[A-Z]+|KO)=' >"$RESULTS/guest-env" || true
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
	printf 'label: dos\nstart=2048, size=65536, type=83\nstart=67600, type=83\n' |
		sfdisk --quiet "$RESULTS/disk-b.img" >/dev/null
	for d in a b c d e; do
		QEMU_DRIVES+="$(drive "$RESULTS/disk-$d.img" "blksnap-$d") "
	done
	QEMU_DRIVES+="$(drive "$RESULTS/disk-f.img" blksnap-f ,cache=writeback) "
	QEMU_DRIVES+="$(drive "$RESULTS/disk-g.img" blksnap-g ,cache=none,throttling.bps-write=65536) "
fi

echo "qemu: booting $(cat "$KOUT/include/config/kernel.release") ($MODE), results in $RESULTS"
start=$(date +%s)
set +e
timeout --foreground "$TIMEOUT" vng --run "$KOUT" --disable-kvm --disable-microvm --force-9p \
	--cpus 2 --memory 2G --verbose \
	--append "oops=panic panic=-1 softlockup_panic=0 hung_task_panic=0" \
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
report() { # name ok|reason
	if [ "$2" = ok ]; then
		passed=$((passed + 1))
		echo "ok $1"
	else
		failed=$((failed + 1))
		echo "FAIL $1: $2"
	fi
}

if grep -q 'KernelAddressSanitizer initialized' "$RESULTS/console.log" &&
	grep -q 'Lock dependency validator' "$RESULTS/console.log"; then
	report debug_kernel ok
	grep -m1 'Linux version' "$RESULTS/console.log" | sed 's/^/    | /'
	grep -m1 'KernelAddressSanitizer initialized' "$RESULTS/console.log" | sed 's/^/    | /'
else
	report debug_kernel "no KASAN/lockdep banner in the guest log"
fi

# The kernel command line (hung_task_panic=0) is no report.
splats=$(grep -E 'BUG:|WARNING:|KASAN:|Oops|possible circular locking|possible recursive locking|inconsistent lock state|INFO: task .* blocked|Kernel panic|general protection fault|UBSAN:|soft lockup|hung_task|blocked for more than|rcu_sched self-detected stall|self-detected stall|rcu: INFO' \
	"$RESULTS/console.log" | grep -v '^FAIL ' | grep -v '^    |' | grep -vi 'command line:' || true)
if [ -z "$splats" ]; then
	report kernel_log_clean ok
else
	report kernel_log_clean "$(echo "$splats" | head -1)"
	echo "$splats" | head -20 | sed 's/^/    | /'
fi

if [ ! -f "$RESULTS/kmemleak.txt" ]; then
	report no_memory_leaks "no kmemleak report (guest did not finish)"
elif grep -q 'unreferenced object' "$RESULTS/kmemleak.txt"; then
	report no_memory_leaks "$(grep -c 'unreferenced object' "$RESULTS/kmemleak.txt") leaks, see $RESULTS/kmemleak.txt"
	head -30 "$RESULTS/kmemleak.txt" | sed 's/^/    | /'
else
	report no_memory_leaks ok
fi

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

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
