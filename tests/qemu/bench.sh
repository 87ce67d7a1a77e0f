#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# The benchmark (make bench), inside the guest: throughput of the origin and
# of the snapshot image as ratios to the raw device, all measured in this one
# VM run on the same 400 MiB virtio disk. fio, O_DIRECT, psync.
set -eu
DISK=
for d in /sys/block/vd*; do
	[ "$(cat "$d/serial" 2>/dev/null)" = blksnap-e ] && DISK=/dev/${d##*/}
done
SIZE=256M

# fio_bw RW BS DEV [IO_SIZE]: bandwidth in KiB/s.
fio_bw() {
	local dir=write extra=
	case $1 in *read*) dir=read extra=--readonly ;; esac
	fio --name=bench --filename="$3" --rw="$1" --bs="$2" --size=$SIZE --io_size="${4:-$SIZE}" \
		--direct=1 --ioengine=psync --randrepeat=1 --norandommap $extra \
		--output-format=json 2>/dev/null | jq -e ".jobs[0].$dir.bw"
}

# Each figure is the best of three runs: TCG timing is noisy, and the best
# run is the one least disturbed by the host.
declare -A BW
keep() { # key kib/s
	if [ -z "${BW[$1]:-}" ] || [ "$2" -gt "${BW[$1]}" ]; then BW[$1]=$2; fi
	echo "bench: measured $1: $2 KiB/s"
}
measure() { # key rw bs dev [io_size]
	keep "$1" "$(fio_bw "$2" "$3" "$4" "${5:-}")"
}

# The difference storage kinds, each measured the same way.
KINDS="file memory devices"
serial_disk() { # serial
	local d
	for d in /sys/block/vd*; do
		if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; fi
	done
}
STORE_A=$(serial_disk blksnap-a)
STORE_C=$(serial_disk blksnap-c)

snap() { # kind
	case $1 in
	file) ID=$(blksnapctl snapshot create --store "$BLKSNAP_SCRATCH" --limit 400M) ;;
	memory) ID=$(blksnapctl snapshot create --memory --limit 300M) ;;
	devices)
		# Two store devices: all of the 256 MiB disk a, 64 MiB of disk c.
		ID=$(blksnapctl snapshot create --devices --limit 400M)
		blksnapctl store append "$ID" "$STORE_A" 0:524288
		blksnapctl store append "$ID" "$STORE_C" 0:131072
		;;
	esac
	blksnapctl snapshot add "$ID" "$DISK"
	blksnapctl snapshot take "$ID"
	IMAGE=/dev/$(blksnapctl --json snapshot info "$DISK" | jq -r .image)
	[ -b "$IMAGE" ] || { echo "bench: no snapshot image"; exit 1; }
}
check_intact() { # the snapshot must have survived the measurement
	local err
	err=$(blksnapctl --json snapshot info "$DISK" | jq -r .error_code)
	[ "$err" = 0 ] || { echo "bench: the $1 snapshot failed with error $err"; exit 1; }
}

# Fresh data on the raw device.
dd if=/dev/urandom of="$DISK" bs=1M count=256 oflag=direct status=none
for round in 1 2 3; do
	measure raw_write write 1M "$DISK"
	measure raw_randwrite randwrite 64k "$DISK" 32M
	measure raw_read read 1M "$DISK"
	blksnapctl attach "$DISK" >/dev/null
	measure cbt_write write 1M "$DISK"
	for kind in $KINDS; do
		snap $kind
		measure cow_write_$kind write 1M "$DISK"
		measure stored_write_$kind write 1M "$DISK"
		measure image_read_$kind read 1M "$IMAGE"
		check_intact $kind
		blksnapctl snapshot destroy "$ID"
		snap $kind
		measure cow_randwrite_$kind randwrite 64k "$DISK" 32M
		check_intact $kind
		blksnapctl snapshot destroy "$ID"
	done
	blksnapctl detach "$DISK" >/dev/null
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
row() { # label key base
	printf 'bench: %-44s %8.1f MiB/s  %5s x raw\n' "$1" \
		"$(awk -v k="${BW[$2]}" 'BEGIN { print k / 1024 }')" "$(ratio "${BW[$2]}" "${BW[$3]}")"
}
echo "bench: $DISK, $(($(cat /sys/class/block/${DISK#/dev/}/size) / 2048)) MiB virtio-blk, fio O_DIRECT psync over $SIZE, best of 3 runs, TCG guest"
echo "bench: chunk size $((1 << $(cat /sys/module/blksnap/parameters/chunk_minimum_shift) >> 10)) KiB;" \
	"stores: file = unnamed file on tmpfs, memory = kernel pages, devices = ranges of two virtio disks"
row "raw sequential write, 1 MiB" raw_write raw_write
row "write with tracking (CBT) only" cbt_write raw_write
for kind in $KINDS; do
	row "[$kind] first write after snapshot (COW)" cow_write_$kind raw_write
	row "[$kind] second write (chunks already stored)" stored_write_$kind raw_write
done
row "raw random write, 64 KiB" raw_randwrite raw_randwrite
for kind in $KINDS; do
	row "[$kind] first random write after snapshot" cow_randwrite_$kind raw_randwrite
done
row "raw sequential read, 1 MiB" raw_read raw_read
for kind in $KINDS; do
	row "[$kind] snapshot image sequential read" image_read_$kind raw_read
done
