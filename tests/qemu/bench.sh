#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The benchmark (make bench), inside the guest: blksnap snapshots next to
# dm-snapshot and to the raw disk, all in this one VM run, on the same virtio
# disks, which run.sh throttles in QEMU so that the disk is the bottleneck
# and not the emulated CPU.
#
# Configurations, measured in interleaved rounds (raw, dm-N, dm-P, file,
# memory, devices, raw, ...); each metric is reported as the median and the
# range over the rounds, and as ratios of medians:
#   raw      the origin disk itself;
#   dm-N/P   dm-snapshot, transient (N) or persistent (P): writes go to a
#            snapshot-origin device over the disk, image reads come from the
#            snapshot device; its COW device is the store disk;
#   file     our snapshot, stored in an unnamed file on tmpfs;
#   memory   our snapshot, stored in kernel memory;
#   devices  our snapshot, stored on a range of the store disk.
# For ours, writes go to the origin disk itself (the filter is transparent)
# and image reads come from /dev/blk-snap-imageN. dm-snapshot uses the same
# chunk size as ours (the module's chunk_minimum_shift).
#
# Disks (serials, see run.sh): blksnap-e the origin (the region measured is
# its first BLKSNAP_BENCH_REGION MiB), blksnap-a the store disk (dm COW,
# devices store), blksnap-b/c/d three more origins for the take latency of
# four devices.
#
# Settings from the host (run.sh forwards them): BLKSNAP_BENCH_ROUNDS (5),
# BLKSNAP_BENCH_REGION (MiB, 96), BLKSNAP_BENCH_BPS and BLKSNAP_BENCH_IOPS
# (the QEMU throttling, only printed here), BLKSNAP_BENCH_CONFIGS (a subset
# of the configurations, for quick trials), BLKSNAP_BENCH_ENGINE (libaio, or
# io_uring), BLKSNAP_BENCH_CALIBRATE=1 (only the raw disk: the figures to
# choose the throttling from), BLKSNAP_BENCH_TRACE=1 (set -x with
# timestamps, in the console log).
#
# A process start costs 0.1-1 s in this guest (TCG, binaries and libraries
# read over 9p; fio loads 64 libraries: up to seconds), so the tools started
# often run from copies on tmpfs (stage_tools), and the script starts few:
# jobs that share a snapshot run in one fio run (stonewalled jobs with
# separate figures), JSON is read once per fio run, dm-snapshot switches go
# through one long-lived python3 process, the table is one awk run.
set -eu
if [ "${BLKSNAP_BENCH_TRACE:-0}" = 1 ]; then
	PS4='+ $EPOCHREALTIME '
	set -x
fi

ROUNDS=${BLKSNAP_BENCH_ROUNDS:-5}
REGION_MB=${BLKSNAP_BENCH_REGION:-96}
CONFIGS=${BLKSNAP_BENCH_CONFIGS:-raw dm-N dm-P file memory devices}
# libaio, not io_uring: with io_uring, first writes after a take (1 MiB,
# QD8) to a disk in our snapshot came back to fio with EAGAIN (unthrottled,
# file store), which ends the benchmark. To see it: BLKSNAP_BENCH_ENGINE=
# io_uring BLKSNAP_BENCH_BPS=0 BLKSNAP_BENCH_IOPS=0 BLKSNAP_BENCH_CONFIGS=file
ENGINE=${BLKSNAP_BENCH_ENGINE:-libaio}
# Our stores hold a full overwrite of the region plus slack.
STORE_MB=$((REGION_MB + 16))
# Take latency: each origin writes to its first TAKE_MB MiB; dm's COW for
# it is a TAKE_COW_MB MiB slice of the store disk.
TAKE_MB=16
TAKE_COW_MB=24
# CBT-only job: 4 KiB random writes, this many MiB of them.
CBT_MB=$((REGION_MB / 8))
read -r CHUNK_SHIFT </sys/module/blksnap/parameters/chunk_minimum_shift
CHUNK=$((1 << CHUNK_SHIFT))
WORK=$BLKSNAP_SCRATCH/bench
HZ=$(getconf CLK_TCK)

say() { echo "bench: $*"; }
# Failures go to stderr too, which a command substitution does not take.
fail() {
	say "FAIL: $*" >&2
	exit 1
}
# Any failing command fails the benchmark loudly.
set -E
trap 'say "FAIL: line $LINENO: \"$BASH_COMMAND\" exited with $?" >&2' ERR

# A sleep without starting a process: a read that times out.
exec {SNOOZE_FD}<> <(:)
snooze() { read -rt "$1" -u "$SNOOZE_FD" _ || true; }

serial_disk() { # serial
	local d s
	for d in /sys/block/vd*; do
		read -r s <"$d/serial" || true
		if [ "$s" = "$1" ]; then echo "/dev/${d##*/}"; fi
	done
}
sectors() { # dev
	local s
	read -r s <"/sys/class/block/${1#/dev/}/size"
	echo "$s"
}
mib() { echo $(($(sectors "$1") / 2048)); }

ORIGIN=$(serial_disk blksnap-e)
STORE=$(serial_disk blksnap-a)
# The four origins of the 4-device take: none of them is the store disk.
TAKE_DISKS="$ORIGIN $(serial_disk blksnap-b) $(serial_disk blksnap-c) $(serial_disk blksnap-d)"

check_disks() {
	local d
	for d in $TAKE_DISKS $STORE; do [ -b "$d" ] || fail "disk missing ($TAKE_DISKS, $STORE)"; done
	[ "$(mib "$ORIGIN")" -ge "$REGION_MB" ] || fail "$ORIGIN is smaller than the region"
	[ "$(mib "$STORE")" -ge "$((STORE_MB > 4 * TAKE_COW_MB ? STORE_MB : 4 * TAKE_COW_MB))" ] ||
		fail "the store disk $STORE is too small"
	for d in $TAKE_DISKS; do
		[ "$(mib "$d")" -ge "$TAKE_MB" ] || fail "$d is smaller than $TAKE_MB MiB"
	done
}

# stage_tools: the tools started often, and every library they load, from
# the tar archive on disk blksnap-t (see run.sh) to tmpfs, first in PATH and
# LD_LIBRARY_PATH.
stage_tools() {
	local tar
	tar=$(serial_disk blksnap-t)
	[ -b "$tar" ] || fail "no tools disk (serial blksnap-t)"
	tar -xf "$tar" -C "$BLKSNAP_SCRATCH"
	export PATH=$BLKSNAP_SCRATCH/bin:$PATH LD_LIBRARY_PATH=$BLKSNAP_SCRATCH/lib
}

# ---------------------------------------------------------------- fio

# QEMU's throttle lets a burst through at the full speed whenever a disk was
# idle for a moment (a tenth of a second's worth: 20 MB at 200 MB/s, a
# quarter of a 96 MiB job that writes it raw). The first RAMP_MS of each
# job (its I/O counts towards the job's size) are left out of its figures.
RAMP_MS=150

# fio_run NAME ARGS...: one fio run in $WORK, JSON in NAME.json; fails the
# benchmark if fio or any of its jobs fails.
fio_run() {
	local name=$1
	shift
	if ! (cd "$WORK" && exec fio --output-format=json --output="$name.json" \
		--direct=1 --ioengine="$ENGINE" --randrepeat=0 --ramp_time="${RAMP_MS}ms" \
		"$@") >"$WORK/$name.err" 2>&1; then
		sed 's/^/bench: fio: /' "$WORK/$name.err" | head -20
		fail "fio $name: fio $*"
	fi
}

# fio_results NAME: one line per job of NAME.json, into RES[jobname]:
# "error read-MB/s write-MB/s bytes-moved write-IOPS write-p99-us
# runtime-ms", all after the ramp.
declare -A RES
fio_results() {
	local job rest
	RES=()
	while read -r job rest; do
		RES[$job]=$rest
	done < <(jq -r '.jobs[] | [.jobname, .error, .read.bw_bytes / 1e6, .write.bw_bytes / 1e6,
		.read.io_bytes + .write.io_bytes, .write.iops,
		(.write.clat_ns.percentile["99.000000"] // 0) / 1000, ([.read.runtime, .write.runtime] | max)]
		| map(tostring) | join(" ")' "$WORK/$1.json")
	SKIPPED=()
	for job in "${!RES[@]}"; do
		[ "${RES[$job]%% *}" = 0 ] || fail "fio $1: job $job failed with error ${RES[$job]%% *}"
		[ "$(res "$job" 4)" = 0 ] || continue
		# Now and then (a few times in a hundred runs of a group) fio starts
		# no I/O at all for a stonewalled job and reports no error: its
		# round is left out of the medians, and said so.
		if [ "$(jq --arg j "$job" '.jobs[] | select(.jobname == $j) | .job_runtime' "$WORK/$1.json")" = 0 ]; then
			SKIPPED[$job]=1
			say "warning: fio $1: job $job did not run (no I/O, no error; prerun output: $(head -c 80 "$WORK/$job.prerun.txt" 2>&1)); round $ROUND left out"
			continue
		fi
		fail "fio $1: job $job ended within its ramp: $(jq -c --arg j "$job" \
			'.jobs[] | select(.jobname == $j) | {error, job_runtime, read: .read | {io_bytes, runtime, bw_bytes}, write: .write | {io_bytes, runtime}}' \
			"$WORK/$1.json")"
	done
}
declare -A SKIPPED
res() { # job field(1 error, 2 read MB/s, 3 write MB/s, 4 bytes, 5 IOPS, 6 p99 us, 7 ms)
	local f
	read -ra f <<<"${RES[$1]}"
	echo "${f[$2 - 1]}"
}

# A job reads /proc/stat as its I/O starts and ends (fio's exec_prerun and
# exec_postrun write JOB.prerun.txt and JOB.postrun.txt), so that the CPU
# time of fio's own start and exit is left out.
STAT=(--exec_prerun="head -1 /proc/stat" --exec_postrun="head -1 /proc/stat")
# Guest CPU time of all CPUs, in ticks, in a /proc/stat line: everything but
# idle and iowait (user nice system irq softirq steal; kworkers included).
busy_ticks() { # file
	local user nice sys irq softirq steal rest
	read -r _ user nice sys _ _ irq softirq steal rest <"$1"
	echo $((user + nice + sys + irq + softirq + steal))
}
# cpu_per_gib JOB BYTES: guest CPU seconds per GiB moved during JOB's I/O
# (BYTES: all of them, the ramp's too).
cpu_per_gib() {
	local ticks=$(($(busy_ticks "$WORK/$1.postrun.txt") - $(busy_ticks "$WORK/$1.prerun.txt"))) milli
	[ "$2" -gt 0 ] || fail "job $1 moved no data"
	milli=$((ticks * (1 << 30) * 1000 / (HZ * $2)))
	printf '%d.%03d' $((milli / 1000)) $((milli % 1000))
}

# ---------------------------------------------------------------- results

# VAL["metric cfg"]: the values of the rounds, space separated.
declare -A VAL
record() { # metric cfg value
	VAL["$1 $2"]+="$3 "
	stamp "round $ROUND $2 $1: $3"
}
# A line in the console log (not shown by run.sh), with the time since the
# start in seconds.
START_US=${EPOCHREALTIME/./}
stamp() {
	local ms=$(((${EPOCHREALTIME/./} - START_US) / 1000))
	printf 'measure: %d.%03d %s\n' $((ms / 1000)) $((ms % 1000)) "$*"
}

# A group of jobs that run one after the other (stonewalled) in one fio run
# on one snapshot: job METRIC DIR DEV FIO-ARGS... adds one, over the region
# of DEV (LOOPS=N job ...: N times over it, for reads that may come from
# RAM and would otherwise end within the ramp); run_jobs CFG runs them,
# records each one's DIR (read|write) bandwidth and CPU per GiB, then
# checks that the snapshot survived (its failure would stay: our
# error_code, dm's Invalid).
JOBS=()
METRICS=()
job() {
	local metric=$1 dir=$2 dev=$3 n=$((${#METRICS[@]} + 1)) mb=$((REGION_MB * ${LOOPS:-1}))
	shift 3
	METRICS+=("$metric:$dir:$mb")
	JOBS+=(--name="m$n" --filename="$dev" --size="${REGION_MB}M" --io_size="${mb}M" "${STAT[@]}")
	[ "$n" = 1 ] || JOBS+=(--stonewall)
	JOBS+=("$@")
}
run_jobs() { # cfg
	local i metric dir mb
	fio_run jobs "${JOBS[@]}"
	fio_results jobs
	for i in "${!METRICS[@]}"; do
		IFS=: read -r metric dir mb <<<"${METRICS[i]}"
		[ -z "${SKIPPED[m$((i + 1))]:-}" ] || continue
		if [ "$dir" = read ]; then
			record "$metric" "$1" "$(res "m$((i + 1))" 2)"
		else
			record "$metric" "$1" "$(res "m$((i + 1))" 3)"
		fi
		record "cpu_$metric" "$1" "$(cpu_per_gib "m$((i + 1))" $((mb << 20)))"
	done
	JOBS=() METRICS=()
	check_intact "$1"
}

# measure_under_writes METRIC CFG QD: sequential 1 MiB image reads at QD
# over the region while a second job writes 64 KiB blocks at random to the
# origin at QD4 (until the reads are done: --exitall).
measure_under_writes() {
	local metric=$1 cfg=$2 qd=$3
	fio_run under --exitall \
		--name=m --filename="$IMAGE" --rw=read --bs=1M --iodepth="$qd" --size="${REGION_MB}M" "${STAT[@]}" \
		--name=w --filename="$TARGET" --rw=randwrite --bs=64k --iodepth=4 --size="${REGION_MB}M" \
		--time_based --runtime=3600
	fio_results under
	record "$metric" "$cfg" "$(res m 2)"
	record "${metric}_w" "$cfg" "$(res w 3)"
	# The writer's bytes in the ramp: at the rate it had after it.
	record "cpu_$metric" "$cfg" "$(cpu_per_gib m \
		$(((REGION_MB << 20) + $(res w 4) * ($(res w 7) + RAMP_MS) / $(res w 7))))"
	check_intact "$cfg"
}

# CBT only: 4 KiB random writes at QD32 to the origin disk, attached to the
# module (ours) or not (raw); IOPS and p99 completion latency.
measure_cbt() { # cfg
	fio_run cbt --name=m --filename="$ORIGIN" --rw=randwrite --bs=4k --iodepth=32 \
		--size="${REGION_MB}M" --io_size="${CBT_MB}M" "${STAT[@]}"
	fio_results cbt
	record cbt_iops "$1" "$(res m 5)"
	record cbt_p99 "$1" "$(res m 6)"
	record cpu_cbt_iops "$1" "$(cpu_per_gib m $((CBT_MB << 20)))"
}

# ---------------------------------------------------------------- dm-snapshot

# The switch to a dm snapshot, what lvcreate -s does: suspend the
# snapshot-origin devices, load each snapshot's table into its (new, empty)
# device and resume it, resume the origins. A python3 process, started once
# (coproc DMTAKE), does it with straight ioctls on /dev/mapper/control and
# times it from the first suspend to the last resume, so that no process
# start is counted (dmsetup would take ten for four devices). It reads one
# line per switch, ORIGIN SNAP TABLE [ORIGIN SNAP TABLE]... separated by
# tabs, and answers "ok MS" or "error ...".
write_dmtake() {
	cat >"$WORK/dmtake.py" <<'EOF'
import fcntl, os, struct, sys, time

# struct dm_ioctl and struct dm_target_spec (include/uapi/linux/dm-ioctl.h).
HDR = struct.Struct("=3IIIIiIIIQ128s129s7s")
SPEC = struct.Struct("=QQiI16s")
assert HDR.size == 312 and SPEC.size == 40
def ioc(nr):  # _IOWR(DM_IOCTL, nr, struct dm_ioctl)
    return (3 << 30) | (HDR.size << 16) | (0xFD << 8) | nr
DEV_CREATE, DEV_SUSPEND, TABLE_LOAD = ioc(3), ioc(6), ioc(9)
SUSPEND_FLAG = 1 << 1

def dm(fd, cmd, name, flags=0, table=None):
    data = b""
    if table:
        start, length, ttype, params = table.split(None, 3)
        p = params.encode() + b"\0"
        p += b"\0" * (-(SPEC.size + len(p)) % 8)
        data = SPEC.pack(int(start), int(length), 0, SPEC.size + len(p), ttype.encode()) + p
    buf = bytearray(HDR.pack(4, 0, 0, HDR.size + len(data), HDR.size, 1 if table else 0,
                             0, flags, 0, 0, 0, name.encode(), b"", b"") + data)
    fcntl.ioctl(fd, cmd, buf)

def switch(fd, devs):
    for _, snap, _ in devs:
        dm(fd, DEV_CREATE, snap)
    suspended = []
    try:
        t0 = time.monotonic_ns()
        for origin, _, _ in devs:
            dm(fd, DEV_SUSPEND, origin, SUSPEND_FLAG)
            suspended.append(origin)
        for _, snap, table in devs:
            dm(fd, TABLE_LOAD, snap, table=table)
            dm(fd, DEV_SUSPEND, snap)  # resume: the loaded table goes live
        for origin, _, _ in devs:
            dm(fd, DEV_SUSPEND, origin)
            suspended.remove(origin)
        return (time.monotonic_ns() - t0) / 1e6
    finally:
        for origin in suspended:
            dm(fd, DEV_SUSPEND, origin)

fd = os.open("/dev/mapper/control", os.O_RDWR)
for line in iter(sys.stdin.readline, ""):
    a = line.rstrip("\n").split("\t")
    try:
        print("ok %.3f" % switch(fd, [a[i:i + 3] for i in range(0, len(a), 3)]), flush=True)
    except Exception as e:
        print("error %r" % e, flush=True)
EOF
}
start_dmtake() {
	write_dmtake
	coproc DMTAKE { exec python3 -u "$WORK/dmtake.py"; }
}
# dm_switch ORIGIN SNAP TABLE...: sets SWITCH_MS.
dm_switch() {
	local IFS=$'\t' reply
	echo "$*" >&"${DMTAKE[1]}"
	read -r reply <&"${DMTAKE[0]}" || fail "the dm switch helper died"
	case $reply in
	ok\ *) SWITCH_MS=${reply#ok } ;;
	*) fail "dm switch $*: $reply" ;;
	esac
}

# udev is held (see main): dmsetup must not wait for it, and reaches the
# devices as /dev/dm-N, which the kernel makes.
DMSETUP=(dmsetup --noudevsync)
dm_dev() { # name: /dev/dm-N
	local d n
	for d in /sys/block/dm-*; do
		read -r n <"$d/dm/name"
		if [ "$n" = "$1" ]; then
			echo "/dev/${d##*/}"
			return
		fi
	done
	fail "no dm device $1"
}
# dm_origin NAME DISK: a snapshot-origin device over DISK.
dm_origin() { "${DMSETUP[@]}" create "$1" --table "0 $(sectors "$2") snapshot-origin $2"; }
# dm_snap_table DISK COW N|P: the snapshot's table.
dm_snap_table() { echo "0 $(sectors "$1") snapshot $1 $2 $3 $((CHUNK / 512))"; }
# dm_fresh_cow COW N|P: a persistent store starts with a zeroed header
# chunk, otherwise dm would load the exceptions of the previous snapshot.
dm_fresh_cow() {
	[ "$2" = N ] || dd if=/dev/zero of="$1" bs="$CHUNK" count=1 oflag=direct status=none
}
# dm_check SNAP: an overflowed or failed snapshot shows "Invalid" (or
# anything else than used/total metadata sectors) in its status.
dm_check() {
	local st
	st=$("${DMSETUP[@]}" status "$1")
	[[ $st =~ ^0\ [0-9]+\ snapshot\ [0-9]+/[0-9]+\ [0-9]+$ ]] || fail "dm-snapshot $1: $st"
}
dm_remove() { # names...
	local n
	for n in "$@"; do "${DMSETUP[@]}" remove "$n"; done
}

# ---------------------------------------------------------------- ours

# ours_create KIND MIB: a new snapshot (ID) with a store of KIND.
ours_create() {
	case $1 in
	file) ID=$(blksnapctl snapshot create --store "$BLKSNAP_SCRATCH" --limit "$2M") ;;
	memory) ID=$(blksnapctl snapshot create --memory --limit "$2M") ;;
	devices)
		ID=$(blksnapctl snapshot create --devices)
		blksnapctl store append "$ID" "$STORE" "0:$(($2 * 2048))"
		;;
	esac
}
# ours_info DEV: sets IMAGE_NAME and ERROR_CODE from snapshot info.
ours_info() {
	local json
	json=$(blksnapctl --json snapshot info "$1")
	[[ $json =~ \"image\":\"([^\"]*)\" ]] || fail "snapshot info $1: $json"
	IMAGE_NAME=${BASH_REMATCH[1]}
	[[ $json =~ \"error_code\":(-?[0-9]+) ]] || fail "snapshot info $1: $json"
	ERROR_CODE=${BASH_REMATCH[1]}
}

# ---------------------------------------------------------------- snapshots

# take CFG: a fresh snapshot of the origin; sets TARGET (where the jobs
# write) and IMAGE (what they read as the snapshot).
take() {
	case $1 in
	raw) TARGET=$ORIGIN IMAGE=$ORIGIN ;;
	dm-N | dm-P)
		dm_origin bench-origin "$ORIGIN"
		dm_fresh_cow "$STORE" "${1#dm-}"
		dm_switch bench-origin bench-snap "$(dm_snap_table "$ORIGIN" "$STORE" "${1#dm-}")"
		TARGET=$(dm_dev bench-origin) IMAGE=$(dm_dev bench-snap)
		;;
	*)
		ours_create "$1" "$STORE_MB"
		blksnapctl snapshot add "$ID" "$ORIGIN"
		blksnapctl snapshot take "$ID"
		ours_info "$ORIGIN"
		TARGET=$ORIGIN IMAGE=/dev/$IMAGE_NAME
		;;
	esac
	[ -b "$IMAGE" ] || fail "$1: no snapshot image"
	stamp "$1: taken"
}

# check_intact CFG: the snapshot of the origin must have survived.
check_intact() {
	case $1 in
	raw) ;;
	dm-*) dm_check bench-snap ;;
	*)
		ours_info "$ORIGIN"
		[ "$ERROR_CODE" = 0 ] || fail "$1: the snapshot failed with error $ERROR_CODE"
		;;
	esac
}

release() { # cfg
	case $1 in
	raw) ;;
	dm-*) dm_remove bench-snap bench-origin ;;
	*) blksnapctl snapshot destroy "$ID" ;;
	esac
	stamp "$1: released"
}

# ---------------------------------------------------------------- take latency

# take_latency CFG N LOAD: the time of the switch for the first N of
# TAKE_DISKS, idle or under writes (LOAD=writes: 64 KiB random writes at QD4
# to each device from before until after the take). Ours: the window from
# the freeze to the thaw that the module logs (memory store), and the time
# of the take ioctl that blksnapctl measures; dm: see dm_switch.
take_latency() {
	local cfg=$1 n=$2 load=$3 disks=() i ms fio_pid="" targets=() switch=()
	read -ra disks <<<"$TAKE_DISKS"
	disks=("${disks[@]:0:$n}")
	case $cfg in
	dm-*)
		for i in "${!disks[@]}"; do
			dm_origin "bench-o$i" "${disks[i]}"
			"${DMSETUP[@]}" create "bench-c$i" \
				--table "0 $((TAKE_COW_MB * 2048)) linear $STORE $((i * TAKE_COW_MB * 2048))"
			dm_fresh_cow "$(dm_dev "bench-c$i")" "${cfg#dm-}"
			targets+=("$(dm_dev "bench-o$i")")
			switch+=("bench-o$i" "bench-s$i" "$(dm_snap_table "${disks[i]}" "$(dm_dev "bench-c$i")" "${cfg#dm-}")")
		done
		;;
	*)
		ours_create memory $((n * TAKE_MB + 16))
		for i in "${!disks[@]}"; do
			blksnapctl snapshot add "$ID" "${disks[i]}"
			targets+=("${disks[i]}")
		done
		;;
	esac
	stamp "$cfg: $n-device snapshot set up"
	if [ "$load" = writes ]; then
		start_writers "${targets[@]}"
		fio_pid=$!
	fi
	case $cfg in
	dm-*)
		dm_switch "${switch[@]}"
		ms=$SWITCH_MS
		;;
	*)
		local json line
		json=$(blksnapctl --json snapshot take "$ID")
		record "take${n}_${load}_ioctl" "$cfg" "$(jq -r .ioctl_ms <<<"$json")"
		# The module's own measure, from the freeze to the thaw.
		line=$(dmesg | grep "snapshot $ID taken: " | tail -n 1)
		[[ $line =~ frozen\ for\ ([0-9.]+)\ ms ]] || fail "no take window in the kernel log: $line"
		ms=${BASH_REMATCH[1]}
		;;
	esac
	if [ -n "$fio_pid" ]; then
		wait "$fio_pid" || fail "the writers of the $n-device take failed: $(cat "$WORK/writers.err")"
	fi
	record "take${n}_$load" "$cfg" "$ms"
	case $cfg in
	dm-*)
		for i in "${!disks[@]}"; do dm_check "bench-s$i"; done
		for i in "${!disks[@]}"; do dm_remove "bench-s$i" "bench-o$i" "bench-c$i"; done
		;;
	*)
		for i in "${!disks[@]}"; do
			ours_info "${disks[i]}"
			[ "$ERROR_CODE" = 0 ] || fail "$cfg: the $n-device snapshot failed on ${disks[i]}: $ERROR_CODE"
		done
		blksnapctl snapshot destroy "$ID"
		;;
	esac
	stamp "$cfg: $n-device snapshot gone"
}

# start_writers DEVS...: fio in the background ($!), 2 s of 64 KiB random
# writes at QD4 over the first TAKE_MB MiB of each device; returns once
# every job's I/O runs (its prerun file exists) and 0.3 s more.
start_writers() {
	local args=() i=0 d started=0 files
	rm -f "$WORK"/w*.prerun.txt
	for d in "$@"; do
		args+=(--name="w$i" --filename="$d" --rw=randwrite --bs=64k --iodepth=4 --size="${TAKE_MB}M"
			--time_based --runtime=2 --exec_prerun=true)
		i=$((i + 1))
	done
	(cd "$WORK" && exec fio --output-format=json --output=writers.json --direct=1 \
		--ioengine="$ENGINE" --randrepeat=0 "${args[@]}") >"$WORK/writers.err" 2>&1 &
	for _ in $(seq 300); do
		shopt -s nullglob
		files=("$WORK"/w*.prerun.txt)
		shopt -u nullglob
		started=${#files[@]}
		[ "$started" = $# ] && break
		snooze 0.05
	done
	[ "$started" = $# ] || fail "the writers did not start: $(cat "$WORK/writers.err")"
	snooze 0.3
}

# ---------------------------------------------------------------- one round

# run_config CFG: every job of one round for one configuration, each
# first-touch run on a fresh snapshot.
run_config() {
	local cfg=$1 d qd
	case $cfg in raw | dm-*) ;; *) blksnapctl attach "$ORIGIN" >/dev/null ;; esac
	case $cfg in raw | file | memory | devices) measure_cbt "$cfg" ;; esac

	# Image reads right after the take (no chunk stored), then the first
	# sequential write (copy-on-write) and its rewrite, at QD1.
	take "$cfg"
	job rd0_qd1 read "$IMAGE" --rw=read --bs=1M --iodepth=1
	job rd0_qd4 read "$IMAGE" --rw=read --bs=1M --iodepth=4
	job w1_qd1 write "$TARGET" --rw=write --bs=1M --iodepth=1
	job rw_qd1 write "$TARGET" --rw=write --bs=1M --iodepth=1
	run_jobs "$cfg"
	release "$cfg"
	# The same at QD8, then image reads with every chunk stored.
	take "$cfg"
	job w1_qd8 write "$TARGET" --rw=write --bs=1M --iodepth=8
	job rw_qd8 write "$TARGET" --rw=write --bs=1M --iodepth=8
	# File and memory stores serve these from RAM, several times faster
	# than the disk: three times over the region, so that they outlast the
	# ramp.
	LOOPS=3 job rdS_qd1 read "$IMAGE" --rw=read --bs=1M --iodepth=1
	LOOPS=3 job rdS_qd4 read "$IMAGE" --rw=read --bs=1M --iodepth=4
	run_jobs "$cfg"
	release "$cfg"
	# Random first writes: 64 KiB blocks at 64 KiB offsets (fio aligns to
	# the block size; any blockalign= would turn the random map off), each
	# once (random map), so each lies in one chunk and the region ends up
	# fully written.
	for qd in 1 8; do
		take "$cfg"
		job "rnd_qd$qd" write "$TARGET" --rw=randwrite --bs=64k --iodepth="$qd"
		run_jobs "$cfg"
		release "$cfg"
	done
	# Image reads under random writes to the origin.
	for qd in 1 4; do
		take "$cfg"
		measure_under_writes "rdW_qd$qd" "$cfg" "$qd"
		release "$cfg"
	done

	case $cfg in
	dm-* | memory)
		if [ "$cfg" = memory ]; then
			for d in $TAKE_DISKS; do [ "$d" = "$ORIGIN" ] || blksnapctl attach "$d" >/dev/null; done
		fi
		take_latency "$cfg" 1 idle
		take_latency "$cfg" 1 writes
		take_latency "$cfg" 4 idle
		take_latency "$cfg" 4 writes
		if [ "$cfg" = memory ]; then
			for d in $TAKE_DISKS; do [ "$d" = "$ORIGIN" ] || blksnapctl detach "$d" >/dev/null; done
		fi
		;;
	esac
	case $cfg in raw | dm-*) ;; *) blksnapctl detach "$ORIGIN" >/dev/null ;; esac
}

# ---------------------------------------------------------------- the table

# print_table: one awk run (a process start per cell would take minutes)
# over the values ("metric cfg|v1 v2 ...") and the table's layout, one line
# each:
#   text|TEXT                         a line as it is
#   head                              the column names
#   row|LABEL|METRIC|FORMAT           median [min-max] of each configuration
#   metric|LABEL|METRIC|FORMAT[|cpu]  the row, its ratios of medians to raw
#                                     and of ours to dm-N and dm-P, and the
#                                     CPU s/GiB row
print_table() {
	local k
	for k in "${!VAL[@]}"; do echo "$k|${VAL[$k]}"; done >"$WORK/values"
	table_layout >"$WORK/layout"
	awk -F'|' -v cols="raw dm-N dm-P file memory devices" -v lw=46 -v cw=19 '
	function stats(key,   n, v, i, j, t) {
		n = split(vals[key], v, " ")
		for (i = 2; i <= n; i++)
			for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) {
				t = v[j]; v[j] = v[j - 1]; v[j - 1] = t
			}
		if (n == 0)
			return 0
		med = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
		lo = v[1]; hi = v[n]
		return 1
	}
	function median(key) { return stats(key) ? med : "" }
	function line(label, cells,   out, i) {
		out = sprintf("%-" lw "s", label)
		for (i = 1; i <= ncol; i++)
			out = out " | " sprintf("%-" cw "s", cells[i])
		sub(/ +$/, "", out)
		print "bench: " out
	}
	function row(label, metric, fmt,   cells, i) {
		for (i = 1; i <= ncol; i++)
			cells[i] = stats(metric " " col[i]) ? sprintf(fmt " [" fmt "-" fmt "]", med, lo, hi) : "-"
		line(label, cells)
	}
	function ratios(label, metric, base, which,   cells, i, b, m, any) {
		b = median(metric " " base)
		for (i = 1; i <= ncol; i++) {
			cells[i] = ""
			m = median(metric " " col[i])
			if (index(" " which " ", " " col[i] " ") && m != "" && b != "" && b > 0) {
				cells[i] = sprintf("%.2f", m / b)
				any = 1
			}
		}
		if (any)
			line(label, cells)
	}
	BEGIN { ncol = split(cols, col, " ") }
	FNR == NR { vals[$1] = $2; next }
	$1 == "text" { print "bench: " $2 }
	$1 == "head" { for (i = 1; i <= ncol; i++) names[i] = col[i]; line("metric", names) }
	$1 == "row" { row($2, $3, $4) }
	$1 == "metric" {
		row($2, $3, $4)
		ratios("    / raw", $3, "raw", "dm-N dm-P file memory devices")
		ratios("    ours / dm-N", $3, "dm-N", "file memory devices")
		ratios("    ours / dm-P", $3, "dm-P", "file memory devices")
		if ($5 == "cpu")
			row("    CPU s/GiB", "cpu_" $3, "%.3g")
	}' "$WORK/values" "$WORK/layout"
}

table_layout() {
	cat <<EOT
text|==== results: median [min-max] of $ROUNDS rounds; ratios of medians
head
text|-- MB/s over the origin region of $REGION_MB MiB; first = first write after a fresh take
metric|seq write 1M QD1, first (copy-on-write)|w1_qd1|%.1f|cpu
metric|seq write 1M QD8, first (copy-on-write)|w1_qd8|%.1f|cpu
metric|rand write 64k QD1, first (each 64k once)|rnd_qd1|%.1f|cpu
metric|rand write 64k QD8, first (each 64k once)|rnd_qd8|%.1f|cpu
metric|seq rewrite 1M QD1 (chunks stored)|rw_qd1|%.1f|cpu
metric|seq rewrite 1M QD8 (chunks stored)|rw_qd8|%.1f|cpu
text|-- MB/s, image sequential reads (raw: the disk)
metric|image read 1M QD1, right after take|rd0_qd1|%.1f|cpu
metric|image read 1M QD4, right after take|rd0_qd4|%.1f|cpu
metric|image read 1M QD1, all chunks stored|rdS_qd1|%.1f|cpu
metric|image read 1M QD4, all chunks stored|rdS_qd4|%.1f|cpu
metric|image read 1M QD1, under rand writes|rdW_qd1|%.1f|cpu
row|    the writer (64k rand QD4), MB/s|rdW_qd1_w|%.1f
metric|image read 1M QD4, under rand writes|rdW_qd4|%.1f|cpu
row|    the writer (64k rand QD4), MB/s|rdW_qd4_w|%.1f
text|-- CBT only (ours: attached, no snapshot; raw: not attached), 4k rand write QD32
metric|IOPS|cbt_iops|%.0f|cpu
metric|p99 completion latency, us|cbt_p99|%.0f
text|-- take latency, ms, freeze to thaw (ours: the module's log, memory store; dm: suspend origins .. resume origins)
metric|take, 1 device, idle|take1_idle|%.2f
metric|take, 1 device, under writes|take1_writes|%.2f
metric|take, 4 devices, idle|take4_idle|%.2f
metric|take, 4 devices, under writes|take4_writes|%.2f
text|-- the whole take ioctl, ms (ours: timed by blksnapctl around the ioctl; includes making the images)
row|take ioctl, 1 device, idle|take1_idle_ioctl|%.1f
row|take ioctl, 1 device, under writes|take1_writes_ioctl|%.1f
row|take ioctl, 4 devices, idle|take4_idle_ioctl|%.1f
row|take ioctl, 4 devices, under writes|take4_writes_ioctl|%.1f
EOT
}

# ---------------------------------------------------------------- precision

# measure_precision: how close an incremental backup comes to the bytes
# that changed. A full backup of the 1 GiB disk blksnap-i (unthrottled),
# then fio writes PRECISION_MB MiB of 4 KiB blocks at random over it (each
# block once), then an incremental: the bytes it read from the snapshot
# image against the bytes that differ between the two backups' images,
# compared 4 KiB by 4 KiB, and what the CBT blocks alone would have copied.
PRECISION_MB=${BLKSNAP_BENCH_PRECISION_MB:-16}
measure_precision() {
	local dev dir=$BLKSNAP_SCRATCH/precision name json read info bs
	dev=$(serial_disk blksnap-i)
	[ -b "$dev" ] || fail "no precision disk (serial blksnap-i)"
	name=${dev#/dev/}
	rm -rf "$dir"
	mkdir -p "$dir/store"
	blksnapctl attach "$dev" >/dev/null
	blksnapctl backup full "$dev" --store "$dir/store" --limit 64M --to "$dir" >/dev/null
	cp --sparse=always "$dir/$name.img" "$dir/before.img"
	fio_run precision --name=p --filename="$dev" --rw=randwrite --bs=4k --iodepth=16 \
		--size=1G --io_size="${PRECISION_MB}M"
	json=$(blksnapctl --json backup incremental "$dev" --store "$dir/store" --limit 64M --to "$dir")
	read=$(jq -r '.devices[0].copied.read' <<<"$json")
	info=$(blksnapctl --json cbt info "$dev")
	bs=$(jq -r .block_size <<<"$info")
	python3 - "$dir/before.img" "$dir/$name.img" "$bs" "$read" <<'PY' | sed 's/^/bench: /'
import sys
a, b, bs, read = open(sys.argv[1], "rb"), open(sys.argv[2], "rb"), int(sys.argv[3]), int(sys.argv[4])
blocks, coarse, i = 0, set(), 0
while True:
    x, y = a.read(1 << 20), b.read(1 << 20)
    if not x and not y:
        break
    for o in range(0, max(len(x), len(y)), 4096):
        if x[o:o + 4096] != y[o:o + 4096]:
            blocks += 1
            coarse.add((i + o) // bs)
    i += 1 << 20
differ = blocks * 4096
print("precision: the two images differ in %d blocks of 4 KiB (%d bytes)" % (blocks, differ))
print("precision: incremental read %d bytes: %.2f x the bytes that differ (CBT blocks of %d KiB alone: %.2f x)"
      % (read, read / max(differ, 1), bs >> 10, len(coarse) * bs / max(differ, 1)))
PY
	say "precision: fine map $(jq -r '.fine.memory' <<<"$info") bytes for this run (limit $(jq -r '.fine.memory_limit' <<<"$info"), fine blocks $(jq -r '.fine.block_size' <<<"$info") bytes)"
	blksnapctl detach "$dev" >/dev/null
	rm -rf "$dir"
}

# ---------------------------------------------------------------- main

cleanup() {
	local id n
	jobs -p | xargs -r kill 2>/dev/null || true
	wait 2>/dev/null || true
	for n in $(dmsetup ls 2>/dev/null | awk '/^bench-/ { print $1 }'); do
		"${DMSETUP[@]}" resume "$n" 2>/dev/null || true
	done
	for n in bench-snap bench-origin bench-s0 bench-s1 bench-s2 bench-s3 bench-o0 bench-o1 bench-o2 bench-o3 \
		bench-c0 bench-c1 bench-c2 bench-c3; do
		"${DMSETUP[@]}" remove "$n" >/dev/null 2>&1 || true
	done
	for id in $(blksnapctl --json snapshot list 2>/dev/null | jq -r '.snapshots[]'); do
		blksnapctl snapshot destroy "$id" || true
	done
	for n in $TAKE_DISKS; do blksnapctl detach "$n" >/dev/null 2>&1 || true; done
	udevadm control --start-exec-queue 2>/dev/null || true
}

header() {
	local bps=${BLKSNAP_BENCH_BPS:-0} iops=${BLKSNAP_BENCH_IOPS:-0}
	say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { printf "%d MiB", $2 / 1024 }' /proc/meminfo) RAM, TCG"
	say "throttling (QEMU, each disk): $([ "$bps" = 0 ] && echo unlimited || echo "$((bps / 1000000)) MB/s") total," \
		"$([ "$iops" = 0 ] && echo unlimited || echo "$iops") IOPS total"
	say "origin $ORIGIN ($(mib "$ORIGIN") MiB), region $REGION_MB MiB, store disk $STORE ($(mib "$STORE") MiB)," \
		"chunk $((CHUNK >> 10)) KiB (ours: chunk_minimum_shift; dm: $((CHUNK / 512)) sectors)"
	say "fio $(fio --version), engine $ENGINE, O_DIRECT, --randrepeat=0, figures after a ramp of $RAMP_MS ms;" \
		"rounds $ROUNDS, interleaved: $CONFIGS"
	say "stores: dm COW and ours devices on $STORE, file = unnamed file on tmpfs, memory = kernel memory;" \
		"udev held during the run; blksnapctl, fio, jq, dmsetup and their libraries run from tmpfs"
	say "CPU s/GiB: guest non-idle CPU time (all CPUs, /proc/stat) during the job per GiB read+written"
}

calibrate() {
	local j rw bs qd ro
	say "calibration, raw $ORIGIN, region $REGION_MB MiB, $ENGINE, throttling ${BLKSNAP_BENCH_BPS:-0} B/s ${BLKSNAP_BENCH_IOPS:-0} IOPS"
	for j in "write 1M 8" "read 1M 8" "write 1M 1" "randwrite 64k 8" "randread 64k 8" "randwrite 4k 32"; do
		read -r rw bs qd <<<"$j"
		ro=()
		case $rw in *read) ro=(--readonly) ;; esac
		fio_run cal "${ro[@]}" --name=m --filename="$ORIGIN" --rw="$rw" --bs="$bs" --iodepth="$qd" \
			--size="${REGION_MB}M" "${STAT[@]}"
		fio_results cal
		say "calibrate $rw $bs QD$qd: $(jq -r '.jobs[0] | (.read.bw_bytes + .write.bw_bytes) / 1e6 | floor' "$WORK/cal.json") MB/s," \
			"$(jq -r '.jobs[0] | .read.iops + .write.iops | floor' "$WORK/cal.json") IOPS, $(cpu_per_gib m $((REGION_MB << 20))) CPU s/GiB"
	done
}

mkdir -p "$WORK"
check_disks
stage_tools
stamp "tools staged"
if [ "${BLKSNAP_BENCH_CALIBRATE:-0}" = 1 ]; then
	calibrate
	exit 0
fi
trap cleanup EXIT
# udev would probe every new snapshot image and dm device (blkid reads it)
# while the next job runs, and dmsetup would wait for it: its event queue is
# held until the end.
udevadm control --stop-exec-queue 2>/dev/null || true
case " $CONFIGS " in *" dm-"*) start_dmtake ;; esac
header
start=$SECONDS
for ROUND in $(seq "$ROUNDS"); do
	for cfg in $CONFIGS; do
		t=$SECONDS
		run_config "$cfg"
		say "round $ROUND/$ROUNDS $cfg: $((SECONDS - t)) s"
	done
done
say "all rounds: $((SECONDS - start)) s"
print_table
say "==== incremental precision ($PRECISION_MB MiB of 4 KiB random writes over a 1 GiB disk)"
measure_precision
