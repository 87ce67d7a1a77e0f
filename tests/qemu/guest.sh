#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs inside the QEMU guest (see run.sh): loads the module, then runs the
# guest tests (MODE=test), the long fuzzer, stress and fault injection runs
# (MODE=soak), the demo (MODE=demo) or one boot's phase of the persistent
# CBT test (MODE=reboot, PHASE boot1|boot2|boot3), checks for memory leaks
# and unloads the module.
#
# usage: guest.sh test|soak|demo|bench RESULTS REPO [test name filters...]
#        guest.sh reboot RESULTS REPO boot1|boot2|boot3
set -u
MODE=$1 RESULTS=$2 REPO=$3
shift 3
# The files this boot leaves in RESULTS: one set per boot in reboot mode.
SUFFIX=
[ "$MODE" = reboot ] && SUFFIX=-$1
BLKSNAP_KO=$REPO/blk_snap/blksnap.ko
# BLKSNAP_FUZZ_* and friends from the host (see run.sh), and BLKSNAP_KO.
[ -f "$RESULTS/guest-env" ] && . "$RESULTS/guest-env"
KO=$BLKSNAP_KO
BIN=$REPO/target/release
# BLKSNAP_REPO: for the tests that run the repository's files (dist/).
export PATH=$BIN:$PATH BLKSNAP_KO BLKSNAP_RESULTS=$RESULTS BLKSNAP_REPO=$REPO

echo "guest: $(uname -r), $(nproc) CPUs, root $(awk '$2 == "/" { print $3, $4 }' /proc/mounts | tail -1)"
mount -t debugfs none /sys/kernel/debug 2>/dev/null
# A task blocked for 20 s is reported (and fails the test it happens in):
# a hang shows within the test that caused it.
echo 20 >/proc/sys/kernel/hung_task_timeout_secs
echo -1 >/proc/sys/kernel/hung_task_warnings
# A plain tmpfs for difference storages and scratch files. Not on /tmp: the
# repository may be there.
export BLKSNAP_SCRATCH=/run/blksnap
mkdir -p $BLKSNAP_SCRATCH
mount -t tmpfs -o size=1200M tmpfs $BLKSNAP_SCRATCH
KMEMLEAK=/sys/kernel/debug/kmemleak
[ -w $KMEMLEAK ] && echo clear >$KMEMLEAK

insmod "$KO" || { echo "guest-exit 1"; exit 1; }

case $MODE in
test)
	blksnap-guest-tests "$@"
	rc=$?
	;;
soak)
	export BLKSNAP_SOAK=1
	if [ $# = 0 ]; then
		set -- fuzz_ioctls stress_ faults_ pressure_ conc_take_error_paths_under_faults
	fi
	blksnap-guest-tests "$@"
	rc=$?
	;;
demo)
	"$REPO/tests/qemu/demo.sh"
	rc=$?
	;;
bench)
	"$REPO/tests/qemu/bench.sh"
	rc=$?
	;;
reboot)
	blksnap-guest-tests "reboot_$1_"
	rc=$?
	;;
esac

kmemleak_scan() {
	if [ -w $KMEMLEAK ]; then
		# Objects must be a few seconds old to be reported.
		sleep 6
		echo scan >$KMEMLEAK
		echo scan >$KMEMLEAK
		cat $KMEMLEAK >"$RESULTS/kmemleak$SUFFIX.txt"
	fi
}

if [ "$MODE" = reboot ] && [ "$1" != boot3 ]; then
	# Boots 1 and 2 end with the data disk tracked, as a real shutdown does:
	# after `cbt save` a detach (which rmmod needs) would mark the saved
	# state not clean. The leak scan runs with the module loaded.
	echo "    module left loaded: the data disk stays attached, as at a shutdown"
	kmemleak_scan
	dmesg >"$RESULTS/dmesg$SUFFIX.txt"
	if [ "$1" = boot2 ]; then
		# Does not return: a writer, the marker, and run.sh kills QEMU.
		blksnap-guest-tests reboot_power_cut_boot2
		rc=1
	fi
	echo "guest-exit $rc"
	exit "$rc"
fi

# The module must unload: a module left loaded keeps its allocations out of
# the kmemleak scan, and it means a reference leaked. /sys/module, not lsmod:
# a crashing lsmod once made this step skip the unload silently.
if [ -e /sys/module/blksnap ]; then
	# rmmod may never return (the module's exit waits for something that
	# never comes): give it a minute, then report it and go on.
	rmmod blksnap >"$RESULTS/rmmod$SUFFIX.out" 2>&1 &
	pid=$!
	for _ in $(seq 60); do
		kill -0 $pid 2>/dev/null || break
		sleep 1
	done
	if kill -0 $pid 2>/dev/null; then
		out="rmmod did not return within 60 s, in: $(awk '{print $2}' /proc/$pid/stack 2>/dev/null | head -8 | tr '\n' ' ')"
		status=124
	else
		wait $pid
		status=$?
		out=$(cat "$RESULTS/rmmod$SUFFIX.out")
	fi
	if [ $status = 0 ] && [ ! -e /sys/module/blksnap ]; then
		echo "ok module_unloaded"
	else
		echo "FAIL module_unloaded: rmmod blksnap exited with $status:" \
			"$out (refcnt $(cat /sys/module/blksnap/refcnt 2>/dev/null))"
		rc=1
	fi
else
	echo "ok module_unloaded (was not loaded at the end)"
fi
[ ! -e /sys/module/blksnap ] && kmemleak_scan
dmesg >"$RESULTS/dmesg$SUFFIX.txt"
echo "guest-exit $rc"
exit $rc
