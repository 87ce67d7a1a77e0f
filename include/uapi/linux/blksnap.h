/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * blksnap: change block tracking and snapshots of block devices.
 *
 * Binary compatible with the blksnap interface proposed for upstream Linux
 * (module version 2.0.0.0): the structures, their padding, the ioctl
 * encodings and the enum values below must never change.  Extensions get new
 * numbers, marked as such.
 */
#ifndef _UAPI_LINUX_BLKSNAP_H
#define _UAPI_LINUX_BLKSNAP_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Name of the control device: /dev/blksnap-control. */
#define BLKSNAP_CTL "blksnap-control"
/* Name of the block device filter, for BLKFILTER_ATTACH and friends. */
#define BLKSNAP_FILTER_NAME "blksnap"
/* Kept for source compatibility with the upstream header. */
#define BLKSNAP_IMAGE_NAME "blksnap"
/* Prefix of the snapshot image devices: /dev/blk-snap-image0, ... */
#define BLKSNAP_IMAGE_PREFIX "blk-snap-image"
/* ioctl type of the control device. */
#define BLKSNAP 'V'

/**
 * DOC: Commands of the blksnap block device filter
 *
 * These commands are sent with the BLKFILTER_CTL ioctl on a block device the
 * blksnap filter is attached to.  &struct blkfilter_ctl.opt points to the
 * command's argument and &struct blkfilter_ctl.optlen gives its size.  A
 * read-only descriptor of the device is enough (upstream's clients open it
 * with O_DIRECT only); unlike upstream, BLKFILTER_ATTACH, BLKFILTER_DETACH
 * and BLKFILTER_CTL need CAP_SYS_ADMIN.  Every command returns 0 on
 * success; without the filter attached, BLKFILTER_CTL fails with ENOENT.
 */

/**
 * enum blkfilter_ctl_blksnap - Commands of the blksnap filter.
 *
 * @BLKFILTER_CTL_BLKSNAP_CBTINFO:
 *	Get the change tracking parameters: fills &struct blksnap_cbtinfo.
 * @BLKFILTER_CTL_BLKSNAP_CBTMAP:
 *	Read part of the change tracking map as of the last snapshot, described
 *	by &struct blksnap_cbtmap.  Returns 0, as upstream (not the number of
 *	bytes read).  A range that ends exactly at block_count is read; one
 *	outside the map, or starting past its end (where upstream reads past
 *	the map), fails with ENODATA.  The whole map may be read in one call.
 * @BLKFILTER_CTL_BLKSNAP_CBTDIRTY:
 *	Mark sector ranges as changed, described by &struct blksnap_cbtdirty.
 * @BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD:
 *	Add the device to a snapshot, &struct blksnap_snapshotadd.
 * @BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO:
 *	Get the snapshot state of the device: fills &struct
 *	blksnap_snapshotinfo.
 * @BLKFILTER_CTL_BLKSNAP_CBTMAP_ACTIVE:
 *	Extension: like @BLKFILTER_CTL_BLKSNAP_CBTMAP, but reads the active
 *	map, which records changes as they happen.
 * @BLKFILTER_CTL_BLKSNAP_CBTFINE:
 *	Extension: which 4 KiB blocks (or logical blocks, if larger) were
 *	written between two takes, described by &struct blksnap_cbtfine. * @BLKFILTER_CTL_BLKSNAP_CBTPERSIST:
 *	Extension: save the device's change tracking state at
 *	&IOCTL_BLKSNAP_CBT_SAVE under a name, and restore what was saved
 *	under that name at the last shutdown, &struct blksnap_cbtpersist.
 */
enum blkfilter_ctl_blksnap {
	BLKFILTER_CTL_BLKSNAP_CBTINFO = 0,
	BLKFILTER_CTL_BLKSNAP_CBTMAP = 1,
	BLKFILTER_CTL_BLKSNAP_CBTDIRTY = 2,
	BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD = 3,
	BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO = 4,
	BLKFILTER_CTL_BLKSNAP_CBTMAP_ACTIVE = 128,
	BLKFILTER_CTL_BLKSNAP_CBTFINE = 129,
	BLKFILTER_CTL_BLKSNAP_CBTPERSIST = 130,
};

/**
 * struct blksnap_uuid - A 16-byte identifier.
 * @b: The bytes.
 */
struct blksnap_uuid {
	__u8 b[16];
};

/**
 * struct blksnap_cbtinfo - Result of &BLKFILTER_CTL_BLKSNAP_CBTINFO.
 * @device_capacity: Size of the device in bytes when tracking started.
 * @block_size: Size of a tracking block in bytes, a power of two.
 * @block_count: Number of tracking blocks, one map byte each.
 * @generation_id: Identifier of the generation of change numbers.  A new
 *	generation starts when tracking starts and when the change numbers are
 *	exhausted; numbers of different generations cannot be compared.
 * @changes_number: Number of the last snapshot taken in this generation,
 *	0 if none.  A map byte greater than a snapshot's number means the
 *	block changed after that snapshot.
 */
struct blksnap_cbtinfo {
	__u64 device_capacity;
	__u32 block_size;
	__u32 block_count;
	struct blksnap_uuid generation_id;
	__u8 changes_number;
};

/**
 * struct blksnap_cbtmap - Argument of &BLKFILTER_CTL_BLKSNAP_CBTMAP.
 * @offset: First map byte (tracking block) to read.
 * @length: Number of bytes to read.
 * @buffer: User space address of a buffer of @length bytes.
 */
struct blksnap_cbtmap {
	__u32 offset;
	__u32 length;
	__u64 buffer;
};

/**
 * enum blksnap_fine - What &BLKFILTER_CTL_BLKSNAP_CBTFINE says of a block.
 * @BLKSNAP_FINE_CLEAN: Not written in the intervals asked about.
 * @BLKSNAP_FINE_WRITTEN: Written.
 * @BLKSNAP_FINE_UNKNOWN: Not known (the fine map's memory limit, no
 *	memory, a range marked dirty, or an interval no longer kept): the
 *	change tracking map (&BLKFILTER_CTL_BLKSNAP_CBTMAP) has the answer.
 */
enum blksnap_fine {
	BLKSNAP_FINE_CLEAN = 0,
	BLKSNAP_FINE_WRITTEN = 1,
	BLKSNAP_FINE_UNKNOWN = 2,
};

/**
 * struct blksnap_cbtfine - Argument of &BLKFILTER_CTL_BLKSNAP_CBTFINE.
 * @since: Input: the change number of an earlier snapshot; the blocks
 *	written after it was taken, up to the last take, are reported.
 * @block_shift: Output: log2 of the bytes of a fine block.
 * @reserved: Must be zero.
 * @offset: Input: first fine block.
 * @count: Input: number of fine blocks, at most 1 << 24; 0 only fills
 *	the outputs.
 * @buffer: Input: user space address of @count bytes, each set to a
 *	&enum blksnap_fine.
 * @memory: Output: bytes the device's fine map takes.
 * @memory_limit: Output: bytes it may take (module parameter
 *	fine_map_limit_kib); past it, regions are tracked by the change
 *	tracking map alone.
 *
 * A range not all on the device fails with ENODATA, bad input with EINVAL.
 */
struct blksnap_cbtfine {
	__u8 since;
	__u8 block_shift;
	__u8 reserved[6];
	__u64 offset;
	__u64 count;
	__u64 buffer;
	__u64 memory;
	__u64 memory_limit;
};

/* Flag of &struct blksnap_cbtpersist: a restore without a fingerprint is accepted. */
#define BLKSNAP_CBTPERSIST_UNVERIFIED 1

/**
 * enum blksnap_cbt_proof - What proves a device unwritten while it was not
 *	tracked (&struct blksnap_cbtpersist.proof).
 * @BLKSNAP_CBT_PROOF_NONE: Nothing: no known file system.
 * @BLKSNAP_CBT_PROOF_EXT: The ext2/3/4 superblock.
 * @BLKSNAP_CBT_PROOF_XFS: The XFS superblock and allocation group 0's
 *	headers.
 * @BLKSNAP_CBT_PROOF_BTRFS: The btrfs superblock.
 * @BLKSNAP_CBT_PROOF_PARTITIONS: The partition table and the file systems
 *	of all the partitions.
 */
enum blksnap_cbt_proof {
	BLKSNAP_CBT_PROOF_NONE = 0,
	BLKSNAP_CBT_PROOF_EXT = 1,
	BLKSNAP_CBT_PROOF_XFS = 2,
	BLKSNAP_CBT_PROOF_BTRFS = 3,
	BLKSNAP_CBT_PROOF_PARTITIONS = 4,
};

/**
 * struct blksnap_cbtpersist - Argument of &BLKFILTER_CTL_BLKSNAP_CBTPERSIST.
 * @id: Input: the NUL-terminated name, 1 to 63 bytes, under which the
 *	device's state is saved: a name that stays the device's across boots,
 *	such as one of /dev/disk/by-id.  Another tracked device with the same
 *	name: EEXIST.
 * @flags: Input: 0, or BLKSNAP_CBTPERSIST_UNVERIFIED: the caller accepts
 *	that a state saved without a fingerprint (the device has no file
 *	system that proves it unwritten) is restored.  It is recorded at the
 *	next save too: such a state is restored only if both the registration
 *	before the save and the one at the restore gave the flag.
 * @restored: Output: 1 if the state saved under @id at the last shutdown
 *	was restored: the change tracking maps, change numbers and generation
 *	are the saved ones.  0 if nothing was saved under @id.  Otherwise a
 *	negative errno saying why the saved state was refused: -ESTALE, it
 *	was not saved clean (a crash or power cut, a write, detach, take,
 *	&BLKFILTER_CTL_BLKSNAP_CBTDIRTY or snapshot image write after the save,
 *	a boot that used it already, or the copies of a mirrored state
 *	disagree or the mirror is not open); -EBUSY, the device was written,
 *	or a snapshot of it taken, since the filter was attached, or the block
 *	layer counted writes to it before the attach (@writes_before);
 *	-EMEDIUMTYPE, the device's size or change tracking geometry differs
 *	from the saved one; -EXDEV, the saved state is another device's: its
 *	@identity or first sector differs; -ENOKEY, nothing proves the device
 *	unwritten since the save (no fingerprint) and the risk was not
 *	accepted; -EKEYREJECTED, its fingerprint differs: something wrote to
 *	its file system while it was not tracked; -EIO, reading the
 *	fingerprint failed.  A saved state is used at most once.
 * @generation: Output: the device's change tracking generation after the
 *	call.
 * @identity: Input: the device's NUL-terminated identity, at most 127 bytes
 *	(the disk's serial or WWID, the partition's number and first sector,
 *	the size...), saved with the state and compared byte for byte at the
 *	restore.  Optional: a caller that passes only the members up to
 *	@generation (an @optlen of 88) registers an empty identity.
 * @writes_before: Output: the write requests the block layer counted on the
 *	device (for a partition, also those to its whole disk's own node) up
 *	to the call, ~0 if it cannot count them (its iostats are off).
 * @proof: Output: what would prove the device unwritten, as it is now
 *	(&enum blksnap_cbt_proof).  A state saved with a proof is restored
 *	only if the proof's bytes on the device are still the saved ones.
 * @reserved: Must be zero.
 *
 * Fails with ENXIO if no state device is open (&IOCTL_BLKSNAP_CBT_STATE_DEVICE).
 * The call registers the device for &IOCTL_BLKSNAP_CBT_SAVE whether or not
 * a state was restored.  The fine map (&BLKFILTER_CTL_BLKSNAP_CBTFINE) is not
 * saved: after a restore it answers BLKSNAP_FINE_UNKNOWN for the writes
 * before it.
 */
struct blksnap_cbtpersist {
	char id[64];
	__u32 flags;
	__s32 restored;
	__u8 generation[16];
	char identity[128];
	__u64 writes_before;
	__u32 proof;
	__u32 reserved;
};

/**
 * struct blksnap_sectors - A range of sectors.
 * @offset: First sector, from the start of the device.
 * @count: Number of sectors.
 */
struct blksnap_sectors {
	__u64 offset;
	__u64 count;
};

/**
 * struct blksnap_cbtdirty - Argument of &BLKFILTER_CTL_BLKSNAP_CBTDIRTY.
 * @count: Number of ranges at @dirty_sectors, at least 1.
 * @dirty_sectors: User space address of an array of &struct blksnap_sectors.
 */
struct blksnap_cbtdirty {
	__u32 count;
	__u64 dirty_sectors;
};

/**
 * struct blksnap_snapshotadd - Argument of &BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD.
 * @id: Identifier of the snapshot.
 */
struct blksnap_snapshotadd {
	struct blksnap_uuid id;
};

#define IMAGE_DISK_NAME_LEN 32

/**
 * struct blksnap_snapshotinfo - Result of
 *	&BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO.
 * @error_code: 0, or the negative errno that made the snapshot of the device
 *	unusable (-ENOSPC: the difference storage overflowed).
 * @image: Name of the snapshot image block device, or an empty string.
 */
struct blksnap_snapshotinfo {
	__s32 error_code;
	__u8 image[IMAGE_DISK_NAME_LEN];
};

/**
 * DOC: Commands of the control device
 *
 * These ioctls are issued on /dev/blksnap-control, opened read-write, and
 * need CAP_SYS_ADMIN (upstream checks no capability).  Each returns 0 on
 * success.
 */
enum blksnap_ioctl {
	BLKSNAP_IOCTL_VERSION = 0,
	BLKSNAP_IOCTL_SNAPSHOT_CREATE = 1,
	BLKSNAP_IOCTL_SNAPSHOT_DESTROY = 2,
	BLKSNAP_IOCTL_SNAPSHOT_TAKE = 3,
	BLKSNAP_IOCTL_SNAPSHOT_COLLECT = 4,
	BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT = 5,
};

/**
 * struct blksnap_version - Version of the interface.
 * @major: Major version.
 * @minor: Minor version.
 * @revision: Revision.
 * @build: Build number, 0.
 */
struct blksnap_version {
	__u16 major;
	__u16 minor;
	__u16 revision;
	__u16 build;
};

/* Get the interface version.  For logs: features are found by trying them. */
#define IOCTL_BLKSNAP_VERSION						\
	_IOR(BLKSNAP, BLKSNAP_IOCTL_VERSION, struct blksnap_version)

/**
 * struct blksnap_snapshot_create - Argument of
 *	&IOCTL_BLKSNAP_SNAPSHOT_CREATE.
 * @diff_storage_limit_sect: Largest size of the difference storage, in
 *	sectors.
 * @diff_storage_filename: User space address of the NUL-terminated path of
 *	the difference storage: a file, a directory (for an unnamed temporary
 *	file) or a block device.
 * @id: Output: identifier of the new snapshot.
 */
struct blksnap_snapshot_create {
	__u64 diff_storage_limit_sect;
	__u64 diff_storage_filename;
	struct blksnap_uuid id;
};

/* Create a snapshot and its difference storage. */
#define IOCTL_BLKSNAP_SNAPSHOT_CREATE					\
	_IOWR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_CREATE,			\
	      struct blksnap_snapshot_create)

/* Destroy a snapshot: removes its images and storage; tracking goes on. */
#define IOCTL_BLKSNAP_SNAPSHOT_DESTROY					\
	_IOW(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_DESTROY, struct blksnap_uuid)

/* Take a snapshot of all its devices at one instant and create the images. */
#define IOCTL_BLKSNAP_SNAPSHOT_TAKE					\
	_IOW(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_TAKE, struct blksnap_uuid)

/**
 * struct blksnap_snapshot_collect - Argument of
 *	&IOCTL_BLKSNAP_SNAPSHOT_COLLECT.
 * @count: Capacity of @ids in entries; set to the number of snapshots.
 * @ids: User space address of an array of &struct blksnap_uuid, or 0.
 *
 * With @ids 0, a size query: @count is set to the number of snapshots and
 * the ioctl returns 0, whatever @count was (upstream's library starts so).
 * Otherwise the ids are written in creation order and @count is set to their
 * number.  If @count is too small, nothing is copied, @count is set to the
 * number needed and the ioctl fails with ENODATA (upstream copies the first
 * @count ids and leaves @count as it was).
 */
struct blksnap_snapshot_collect {
	__u32 count;
	__u64 ids;
};

/* List the identifiers of the existing snapshots. */
#define IOCTL_BLKSNAP_SNAPSHOT_COLLECT					\
	_IOR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_COLLECT,			\
	     struct blksnap_snapshot_collect)

/**
 * enum blksnap_event_codes - Codes of snapshot events.
 * @blksnap_event_code_corrupted: The snapshot of a device became unusable,
 *	&struct blksnap_event_corrupted.  At most once per device.
 * @blksnap_event_code_no_space: The difference storage is full or about to
 *	be, &struct blksnap_event_no_space.  At most once per snapshot.  A file
 *	raises it, as upstream, when it has grown to its limit and less than
 *	half of the diff_storage_minimum module parameter is free (usually a
 *	corrupted event with ENOSPC follows); a block device given to
 *	&IOCTL_BLKSNAP_SNAPSHOT_CREATE never does.  The extension stores
 *	(memory, device ranges) raise it when they are full.
 *
 * A snapshot created with &IOCTL_BLKSNAP_SNAPSHOT_CREATE gets only these
 * events, and none before it is taken: upstream clients treat any other code
 * as an error.  Our extension events (codes from 64) go only to snapshots
 * created with &IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE.
 */
enum blksnap_event_codes {
	blksnap_event_code_corrupted,
	blksnap_event_code_no_space,
};

/**
 * struct blksnap_snapshot_event - Argument of
 *	&IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT.
 * @id: Identifier of the snapshot.  Left as it was.
 * @timeout_ms: How long to wait for an event, in milliseconds; 0 polls.
 *	Left as it was, so that the structure can be reused for the next call.
 * @code: Output: &enum blksnap_event_codes.
 * @time_label: Output: when the event happened, in nanoseconds of the
 *	kernel's monotonic clock.
 * @data: Output: the event's payload at the start, zeroes after it.
 *
 * Errors, as upstream: ENOENT if no event came before the timeout, EINTR if
 * a signal interrupted the wait (the call is never restarted), ESRCH for an
 * unknown or destroyed snapshot (also for a waiter when its snapshot is
 * destroyed).  Nothing is written back on error.  Each event is delivered
 * once, in order.
 */
struct blksnap_snapshot_event {
	struct blksnap_uuid id;
	__u32 timeout_ms;
	__u32 code;
	__s64 time_label;
	__u8 data[4096 - 32];
};

/*
 * Wait for the next event of a snapshot.  Encoded as _IOR like upstream,
 * although @id and @timeout_ms are read from user space.
 */
#define IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT				\
	_IOR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT,		\
	     struct blksnap_snapshot_event)

/**
 * struct blksnap_event_corrupted - Payload of
 *	&blksnap_event_code_corrupted.
 * @dev_id_mj: Major number of the device.
 * @dev_id_mn: Minor number of the device.
 * @err_code: The errno, POSITIVE (28 for ENOSPC), as upstream; unlike
 *	&struct blksnap_snapshotinfo.error_code, which is negative.
 */
struct blksnap_event_corrupted {
	__u32 dev_id_mj;
	__u32 dev_id_mn;
	__s32 err_code;
};

/**
 * struct blksnap_event_no_space - Payload of &blksnap_event_code_no_space.
 * @requested_nr_sect: The total size of the difference storage requested so
 *	far, in sectors, as upstream: for a file, the size it has grown to (its
 *	limit); for memory or device ranges, all they hold.
 */
struct blksnap_event_no_space {
	__u64 requested_nr_sect;
};

/*
 * Extensions: not in the upstream proposal. Their numbers start at 64, so
 * that upstream can grow without colliding with them.
 */

/**
 * enum blksnap_storage_kind - Kinds of difference storage of
 *	&IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE.
 * @BLKSNAP_STORAGE_MEMORY: Kernel memory, up to the limit.
 * @BLKSNAP_STORAGE_DEVICES: Ranges of block devices, appended with
 *	&IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE before or after the snapshot is
 *	taken.
 */
enum blksnap_storage_kind {
	BLKSNAP_STORAGE_MEMORY = 1,
	BLKSNAP_STORAGE_DEVICES = 2,
};

/**
 * struct blksnap_snapshot_create_storage - Argument of
 *	&IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE.
 * @kind: &enum blksnap_storage_kind.
 * @flags: Must be 0.
 * @limit_sect: For memory: the most sectors it may hold. Ignored for devices.
 * @id: Output: identifier of the new snapshot.
 */
struct blksnap_snapshot_create_storage {
	__u32 kind;
	__u32 flags;
	__u64 limit_sect;
	struct blksnap_uuid id;
};

/* Create a snapshot whose difference storage is in memory or on devices. */
#define IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE				\
	_IOWR(BLKSNAP, 64, struct blksnap_snapshot_create_storage)

/**
 * struct blksnap_snapshot_append_storage - Argument of
 *	&IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE.
 * @id: Identifier of the snapshot.
 * @bdev_path: User space address of the NUL-terminated path of a block
 *	device.  It is opened exclusively.
 * @count: Number of ranges at @ranges, 1 to 1024.
 * @reserved: Must be 0.
 * @ranges: User space address of an array of &struct blksnap_sectors: the
 *	ranges of the device that the storage may use.  They must lie inside
 *	the device and not overlap each other or earlier ranges.
 *
 * The offset and the count of each range, in 512-byte sectors, must be
 * multiples of the device's logical block size: on a device with 4 KiB
 * logical sectors, multiples of 8.  A range that is not is refused with
 * EINVAL (and a kernel log line), not trimmed.  The storage stores chunks in
 * blocks of 4 KiB, or of the logical block size if it is larger, aligned on
 * the device: of a range on a device with 512-byte sectors that does not
 * start or end on a 4 KiB boundary, up to 7 sectors at either end stay
 * unused, and a range that holds no aligned 4 KiB block is refused with
 * EINVAL.
 */
struct blksnap_snapshot_append_storage {
	struct blksnap_uuid id;
	__u64 bdev_path;
	__u32 count;
	__u32 reserved;
	__u64 ranges;
};

/* Give a snapshot with device storage more room, before or after take. */
#define IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE				\
	_IOW(BLKSNAP, 65, struct blksnap_snapshot_append_storage)

/* Flag of &struct blksnap_cbt_state_device: write an empty state header. */
#define BLKSNAP_CBT_STATE_FORMAT 1
/*
 * Flag of &struct blksnap_cbt_state_device: open the device as the mirror of
 * the state device opened before.
 */
#define BLKSNAP_CBT_STATE_MIRROR 2

/**
 * struct blksnap_cbt_state_device - Argument of
 *	&IOCTL_BLKSNAP_CBT_STATE_DEVICE.
 * @bdev_path: User space address of the NUL-terminated path of the block
 *	device that keeps change tracking state across reboots.  It is opened
 *	exclusively until the module unloads, and may be neither tracked nor
 *	a partition or whole disk of a tracked device.
 * @flags: 0, or BLKSNAP_CBT_STATE_FORMAT to start it empty, and
 *	BLKSNAP_CBT_STATE_MIRROR to open it as the mirror of the state device
 *	(opened before, with another call).  Without FORMAT, a device that
 *	holds no state header is refused with ENODATA.
 * @reserved: Must be zero.
 * @records: Output: device states read from it.
 * @clean: Output: 1 if they were saved clean and may be restored (for a
 *	state saved mirrored, once the mirror is open and agrees).
 *
 * Opening it consumes the saved states: before the call returns, they are
 * marked not clean on the device, so that a crash later never lets another
 * boot use them.  A second call with the same device returns the same
 * outputs; with another device it fails with EBUSY.  A mirror is written
 * like the state device at every save, and a write after a save marks the
 * device's saved state broken on both: if that fails on one, the copies
 * disagree at the next boot and nothing is restored.  A state saved
 * mirrored is restored only once its mirror is open.
 */
struct blksnap_cbt_state_device {
	__u64 bdev_path;
	__u32 flags;
	__u32 reserved;
	__u32 records;
	__u32 clean;
};

/* Open the device that keeps change tracking state across reboots. */
#define IOCTL_BLKSNAP_CBT_STATE_DEVICE					\
	_IOWR(BLKSNAP, 66, struct blksnap_cbt_state_device)

/**
 * struct blksnap_cbt_save - Result of &IOCTL_BLKSNAP_CBT_SAVE.
 * @devices: Device states saved.
 * @reserved: Zero.
 * @bytes: Bytes written to the state device.
 *
 * Saves the state of every device registered with
 * &BLKFILTER_CTL_BLKSNAP_CBTPERSIST and marks it clean; meant for the end
 * of shutdown, after file systems are unmounted or read-only.  From then
 * on, the first write to one of those devices, or its detach, waits until
 * the saved state is marked not clean on the state device.  Fails with
 * ENXIO if no state device is open.
 */
struct blksnap_cbt_save {
	__u32 devices;
	__u32 reserved;
	__u64 bytes;
};

/* Save the change tracking state of the registered devices. */
#define IOCTL_BLKSNAP_CBT_SAVE						\
	_IOR(BLKSNAP, 67, struct blksnap_cbt_save)

/*
 * Event extension: the free space of the difference storage dropped below
 * half of the diff_storage_minimum module parameter. Raised once; each
 * append of storage re-arms it, so that the next allocation that leaves less
 * than that free raises it again. Payload: &struct
 * blksnap_event_low_free_space. Only
 * for snapshots created with &IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE.
 */
#define blksnap_event_code_low_free_space 64

/**
 * struct blksnap_event_low_free_space - Payload of
 *	blksnap_event_code_low_free_space.
 * @free_sect: Sectors still free.
 */
struct blksnap_event_low_free_space {
	__u64 free_sect;
};

#endif /* _UAPI_LINUX_BLKSNAP_H */
