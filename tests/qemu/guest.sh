#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Runs inside the QEMU guest (see run.sh): loads the module, then runs the
# guest tests (MODE=test) or the demo (MODE=demo), checks for memory leaks
# and unloads the module.
#
# usage: guest.sh test|demo|bench RESULTS REPO [test name filters...]
set -u
MODE=$1 RESULTS=$2 REPO=$3
shift 3
KO=$REPO/blk_snap/blksnap.ko
BIN=$REPO/target/release
export PATH=$BIN:$PATH BLKSNAP_KO=$KO

echo "guest: $(uname -r), $(nproc) CPUs"
mount -t debugfs none /sys/kernel/debug 2>/dev/null
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
demo)
	"$REPO/tests/qemu/demo.sh"
	rc=$?
	;;
bench)
	"$REPO/tests/qemu/bench.sh"
	rc=$?
	;;
esac

# The module must unload: a module left loaded keeps its allocations out of
# the kmemleak scan, and it means a reference leaked. /sys/module, not lsmod:
# a crashing lsmod once made this step skip the unload silently.
if [ -e /sys/module/blksnap ]; then
	out=$(rmmod blksnap 2>&1)
	status=$?
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
if [ -w $KMEMLEAK ]; then
	# Objects must be a few seconds old to be reported.
	sleep 6
	echo scan >$KMEMLEAK
	echo scan >$KMEMLEAK
	cat $KMEMLEAK >"$RESULTS/kmemleak.txt"
fi
dmesg >"$RESULTS/dmesg.txt"
echo "guest-exit $rc"
exit $rc
