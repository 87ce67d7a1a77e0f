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

lsmod | grep -q '^blksnap' && { rmmod blksnap || rc=1; }
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
