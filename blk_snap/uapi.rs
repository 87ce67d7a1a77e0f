// SPDX-License-Identifier: GPL-2.0

//! Rust mirror of `include/uapi/linux/blk-filter.h` and
//! `include/uapi/linux/blksnap.h`.
//!
//! Shared by the kernel module and the host tests, which check every size,
//! offset and ioctl number here against the C headers and the upstream facts.

use core::mem::size_of;

/// Longest filter name (`BLKFILTER_NAME_LENGTH`).
pub const BLKFILTER_NAME_LENGTH: usize = 32;
/// Name of the filter and of the kernel module.
pub const BLKSNAP_FILTER_NAME: &str = "blksnap";
/// Name of the control device (`BLKSNAP_CTL`).
pub const BLKSNAP_CTL: &str = "blksnap-control";
/// Prefix of the snapshot image block devices.
pub const BLKSNAP_IMAGE_PREFIX: &str = "blk-snap-image";
/// Length of an image name in `struct blksnap_snapshotinfo`.
pub const IMAGE_DISK_NAME_LEN: usize = 32;
/// The ioctl type of the control device (`BLKSNAP`).
pub const BLKSNAP: u32 = b'V' as u32;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

/// `_IOR(ty, nr, T)`.
pub const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}

/// `_IOW(ty, nr, T)`.
pub const fn iow<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_WRITE, ty, nr, size_of::<T>())
}

/// `_IOWR(ty, nr, T)`.
pub const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

/// `struct blkfilter_attach`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlkfilterAttach {
    /// Filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
    /// User address of the options.
    pub opt: u64,
    /// Size of the options.
    pub optlen: u32,
}

/// `struct blkfilter_detach`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlkfilterDetach {
    /// Filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
}

/// `struct blkfilter_ctl`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlkfilterCtl {
    /// Filter name.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
    /// Filter command.
    pub cmd: u32,
    /// Size of the buffer at `opt`.
    pub optlen: u32,
    /// User address of the command argument.
    pub opt: u64,
}

/// `BLKFILTER_ATTACH`.
pub const BLKFILTER_ATTACH: u32 = iowr::<BlkfilterAttach>(0x12, 142);
/// `BLKFILTER_DETACH`.
pub const BLKFILTER_DETACH: u32 = iowr::<BlkfilterDetach>(0x12, 143);
/// `BLKFILTER_CTL`.
pub const BLKFILTER_CTL: u32 = iowr::<BlkfilterCtl>(0x12, 144);

/// `BLKFILTER_CTL` commands of the blksnap filter (`enum blkfilter_ctl_blksnap`).
pub mod ctl {
    /// Get CBT information.
    pub const CBTINFO: u32 = 0;
    /// Read the CBT map as of the last snapshot.
    pub const CBTMAP: u32 = 1;
    /// Mark sector ranges as changed.
    pub const CBTDIRTY: u32 = 2;
    /// Add the device to a snapshot.
    pub const SNAPSHOTADD: u32 = 3;
    /// Get the snapshot state of the device.
    pub const SNAPSHOTINFO: u32 = 4;
    /// Extension: read the active CBT map, which records changes as they
    /// happen.
    pub const CBTMAP_ACTIVE: u32 = 128;
    /// Extension: which fine blocks were written between two takes.
    pub const CBTFINE: u32 = 129;
    /// Extension: save the CBT state at shutdown, restore the saved one.
    pub const CBTPERSIST: u32 = 130;
}

/// Extension: `struct blksnap_cbtpersist`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlksnapCbtpersist {
    /// NUL-terminated name, 1 to 63 bytes.
    pub id: [u8; 64],
    /// Must be zero.
    pub flags: u32,
    /// Output: 1 restored, 0 nothing saved, or a negative errno.
    pub restored: i32,
    /// Output: the generation after the call.
    pub generation: [u8; 16],
}

/// Extension: `BLKSNAP_CBTPERSIST_UNVERIFIED`, a flag of
/// `struct blksnap_cbtpersist`.
pub const CBTPERSIST_UNVERIFIED: u32 = 1;

/// Extension: the second part of `struct blksnap_cbtpersist`, after
/// `generation` (a caller may pass the first part only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlksnapCbtpersistExt {
    /// NUL-terminated identity of the device (serial, partition...).
    pub identity: [u8; 128],
    /// Output: writes the block layer counted before the attach.
    pub writes_before: u64,
    /// Output: what proves the device unwritten (`enum blksnap_cbt_proof`).
    pub proof: u32,
    /// Reserved, 0.
    pub reserved: u32,
}

impl Default for BlksnapCbtpersistExt {
    fn default() -> Self {
        Self {
            identity: [0; 128],
            writes_before: 0,
            proof: 0,
            reserved: 0,
        }
    }
}

/// Extension: `struct blksnap_cbtpersist` whole, as user space passes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlksnapCbtpersistFull {
    /// The first part.
    pub v1: BlksnapCbtpersist,
    /// The rest.
    pub ext: BlksnapCbtpersistExt,
}

impl Default for BlksnapCbtpersist {
    fn default() -> Self {
        Self {
            id: [0; 64],
            flags: 0,
            restored: 0,
            generation: [0; 16],
        }
    }
}

/// `enum blksnap_fine`: what `CBTFINE` says of a block.
pub mod fine {
    /// Not written in the intervals asked about.
    pub const CLEAN: u8 = 0;
    /// Written.
    pub const WRITTEN: u8 = 1;
    /// Not known: the CBT map has the answer.
    pub const UNKNOWN: u8 = 2;
}

/// `struct blksnap_cbtfine`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtfine {
    /// Change number of an earlier snapshot.
    pub since: u8,
    /// Output: log2 of the bytes of a fine block.
    pub block_shift: u8,
    /// Must be zero.
    pub reserved: [u8; 6],
    /// First fine block.
    pub offset: u64,
    /// Number of fine blocks.
    pub count: u64,
    /// User address of `count` bytes.
    pub buffer: u64,
    /// Output: bytes the fine map takes.
    pub memory: u64,
    /// Output: bytes it may take.
    pub memory_limit: u64,
}

/// `struct blksnap_uuid`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BlksnapUuid {
    /// The 16 bytes.
    pub b: [u8; 16],
}

/// `struct blksnap_cbtinfo`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtinfo {
    /// Device size in bytes.
    pub device_capacity: u64,
    /// Tracking block size in bytes.
    pub block_size: u32,
    /// Number of tracking blocks.
    pub block_count: u32,
    /// Generation of the change numbers.
    pub generation_id: BlksnapUuid,
    /// Number of the last snapshot taken in this generation.
    pub changes_number: u8,
}

/// `struct blksnap_cbtmap`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtmap {
    /// First map byte (block) to read.
    pub offset: u32,
    /// Number of bytes to read.
    pub length: u32,
    /// User address of the output buffer.
    pub buffer: u64,
}

/// `struct blksnap_sectors`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BlksnapSectors {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub count: u64,
}

/// `struct blksnap_cbtdirty`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtdirty {
    /// Number of ranges at `dirty_sectors`.
    pub count: u32,
    /// User address of an array of `struct blksnap_sectors`.
    pub dirty_sectors: u64,
}

/// Largest `count` accepted by `CBTDIRTY` (our limit; 1 MiB of ranges).
pub const CBTDIRTY_MAX_COUNT: u32 = 65536;

/// `struct blksnap_snapshotadd`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotadd {
    /// Snapshot id.
    pub id: BlksnapUuid,
}

/// `struct blksnap_snapshotinfo`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotinfo {
    /// Error of the snapshot, 0 if none.
    pub error_code: i32,
    /// Name of the image device, empty if none.
    pub image: [u8; IMAGE_DISK_NAME_LEN],
}

/// `struct blksnap_version`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BlksnapVersion {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Revision.
    pub revision: u16,
    /// Build number.
    pub build: u16,
}

/// `struct blksnap_snapshot_create`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotCreate {
    /// Largest size of the difference storage, in sectors.
    pub diff_storage_limit_sect: u64,
    /// User address of the storage path.
    pub diff_storage_filename: u64,
    /// The new snapshot's id (output).
    pub id: BlksnapUuid,
}

/// `struct blksnap_snapshot_collect`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotCollect {
    /// Capacity of `ids` in entries; set to the number of snapshots.
    pub count: u32,
    /// User address of an array of `struct blksnap_uuid`.
    pub ids: u64,
}

/// Size of `struct blksnap_snapshot_event`: one page.
pub const BLKSNAP_EVENT_SIZE: usize = 4096;

/// `struct blksnap_snapshot_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlksnapSnapshotEvent {
    /// Snapshot id.
    pub id: BlksnapUuid,
    /// How long to wait, in milliseconds.
    pub timeout_ms: u32,
    /// Event code.
    pub code: u32,
    /// Time of the event.
    pub time_label: i64,
    /// Event payload.
    pub data: [u8; BLKSNAP_EVENT_SIZE - 32],
}

/// `enum blksnap_event_codes`.
pub mod event {
    /// The snapshot is corrupted.
    pub const CORRUPTED: u32 = 0;
    /// The difference storage is full.
    pub const NO_SPACE: u32 = 1;
    /// Extension: the difference storage is running low.
    pub const LOW_FREE_SPACE: u32 = 64;
}

/// `struct blksnap_event_corrupted`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapEventCorrupted {
    /// Major number of the device.
    pub dev_id_mj: u32,
    /// Minor number of the device.
    pub dev_id_mn: u32,
    /// The error.
    pub err_code: i32,
}

/// `struct blksnap_event_no_space`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapEventNoSpace {
    /// Number of sectors that were needed.
    pub requested_nr_sect: u64,
}

/// `enum blksnap_ioctl`.
mod nr {
    pub const VERSION: u32 = 0;
    pub const SNAPSHOT_CREATE: u32 = 1;
    pub const SNAPSHOT_DESTROY: u32 = 2;
    pub const SNAPSHOT_TAKE: u32 = 3;
    pub const SNAPSHOT_COLLECT: u32 = 4;
    pub const SNAPSHOT_WAIT_EVENT: u32 = 5;
}

/// `IOCTL_BLKSNAP_VERSION`.
pub const IOCTL_BLKSNAP_VERSION: u32 = ior::<BlksnapVersion>(BLKSNAP, nr::VERSION);
/// `IOCTL_BLKSNAP_SNAPSHOT_CREATE`.
pub const IOCTL_BLKSNAP_SNAPSHOT_CREATE: u32 =
    iowr::<BlksnapSnapshotCreate>(BLKSNAP, nr::SNAPSHOT_CREATE);
/// `IOCTL_BLKSNAP_SNAPSHOT_DESTROY`.
pub const IOCTL_BLKSNAP_SNAPSHOT_DESTROY: u32 = iow::<BlksnapUuid>(BLKSNAP, nr::SNAPSHOT_DESTROY);
/// `IOCTL_BLKSNAP_SNAPSHOT_TAKE`.
pub const IOCTL_BLKSNAP_SNAPSHOT_TAKE: u32 = iow::<BlksnapUuid>(BLKSNAP, nr::SNAPSHOT_TAKE);
/// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`.
pub const IOCTL_BLKSNAP_SNAPSHOT_COLLECT: u32 =
    ior::<BlksnapSnapshotCollect>(BLKSNAP, nr::SNAPSHOT_COLLECT);
/// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`.
pub const IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT: u32 =
    ior::<BlksnapSnapshotEvent>(BLKSNAP, nr::SNAPSHOT_WAIT_EVENT);

/// Extension: `enum blksnap_storage_kind`.
pub mod storage {
    /// Kernel memory.
    pub const MEMORY: u32 = 1;
    /// Appended block device ranges.
    pub const DEVICES: u32 = 2;
}

/// Extension: `struct blksnap_snapshot_create_storage`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotCreateStorage {
    /// Storage kind.
    pub kind: u32,
    /// Flags, 0.
    pub flags: u32,
    /// Limit in sectors.
    pub limit_sect: u64,
    /// The new snapshot's id (output).
    pub id: BlksnapUuid,
}

/// Extension: `struct blksnap_snapshot_append_storage`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapSnapshotAppendStorage {
    /// Snapshot id.
    pub id: BlksnapUuid,
    /// User address of the device path.
    pub bdev_path: u64,
    /// Number of ranges.
    pub count: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// User address of an array of `struct blksnap_sectors`.
    pub ranges: u64,
}

/// Most ranges in one `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE`.
pub const APPEND_MAX_RANGES: u32 = 1024;

/// Extension: `struct blksnap_event_low_free_space`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapEventLowFreeSpace {
    /// Sectors still free.
    pub free_sect: u64,
}

/// Extension: `BLKSNAP_CBT_STATE_FORMAT`.
pub const CBT_STATE_FORMAT: u32 = 1;
/// Extension: `BLKSNAP_CBT_STATE_MIRROR`.
pub const CBT_STATE_MIRROR: u32 = 2;

/// Extension: `struct blksnap_cbt_state_device`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtStateDevice {
    /// User address of the device path.
    pub bdev_path: u64,
    /// 0 or `CBT_STATE_FORMAT`.
    pub flags: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Output: device states read.
    pub records: u32,
    /// Output: 1 if saved clean.
    pub clean: u32,
}

/// Extension: `struct blksnap_cbt_save`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct BlksnapCbtSave {
    /// Device states saved.
    pub devices: u32,
    /// Zero.
    pub reserved: u32,
    /// Bytes written.
    pub bytes: u64,
}

/// Extension: `IOCTL_BLKSNAP_CBT_STATE_DEVICE`.
pub const IOCTL_BLKSNAP_CBT_STATE_DEVICE: u32 = iowr::<BlksnapCbtStateDevice>(BLKSNAP, 66);
/// Extension: `IOCTL_BLKSNAP_CBT_SAVE`.
pub const IOCTL_BLKSNAP_CBT_SAVE: u32 = ior::<BlksnapCbtSave>(BLKSNAP, 67);

/// Extension: `IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE`.
pub const IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE: u32 =
    iowr::<BlksnapSnapshotCreateStorage>(BLKSNAP, 64);
/// Extension: `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE`.
pub const IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE: u32 =
    iow::<BlksnapSnapshotAppendStorage>(BLKSNAP, 65);

/// The interface version reported by `IOCTL_BLKSNAP_VERSION`.
pub const VERSION: BlksnapVersion = BlksnapVersion {
    major: 2,
    minor: 1,
    revision: 0,
    build: 0,
};

/// The name of snapshot image `index`, `blk-snap-image<index>`, and its
/// length; the rest of the array is zero.
pub fn image_name(index: u32) -> ([u8; IMAGE_DISK_NAME_LEN], usize) {
    let mut out = [0u8; IMAGE_DISK_NAME_LEN];
    let prefix = BLKSNAP_IMAGE_PREFIX.as_bytes();
    out[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let (mut n, mut i) = (index, digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = prefix.len() + digits.len() - i;
    out[prefix.len()..len].copy_from_slice(&digits[i..]);
    (out, len)
}

impl BlksnapCbtinfo {
    /// The structure's bytes as user space sees them, with zeroed padding.
    pub fn to_ne_bytes(self) -> [u8; size_of::<Self>()] {
        let mut b = [0u8; size_of::<Self>()];
        b[0..8].copy_from_slice(&self.device_capacity.to_ne_bytes());
        b[8..12].copy_from_slice(&self.block_size.to_ne_bytes());
        b[12..16].copy_from_slice(&self.block_count.to_ne_bytes());
        b[16..32].copy_from_slice(&self.generation_id.b);
        b[32] = self.changes_number;
        b
    }
}

/// Layouts of 32-bit x86 processes on a 64-bit kernel (`CONFIG_COMPAT`),
/// where a `__u64` is only 4-byte aligned: the structures with a `__u64`
/// after a lone `__u32` are 4 bytes shorter, and with them the request
/// numbers that encode their size.
pub mod compat {
    use super::*;

    /// `struct blksnap_snapshot_collect` of a 32-bit process.
    #[repr(C, packed(4))]
    #[derive(Clone, Copy, Default, Debug)]
    pub struct BlksnapSnapshotCollect {
        /// As in the native structure.
        pub count: u32,
        /// As in the native structure.
        pub ids: u64,
    }

    /// `struct blksnap_cbtdirty` of a 32-bit process.
    #[repr(C, packed(4))]
    #[derive(Clone, Copy, Default, Debug)]
    pub struct BlksnapCbtdirty {
        /// As in the native structure.
        pub count: u32,
        /// As in the native structure.
        pub dirty_sectors: u64,
    }

    /// `struct blkfilter_attach` of a 32-bit process.
    #[repr(C, packed(4))]
    #[derive(Clone, Copy, Default, Debug)]
    pub struct BlkfilterAttach {
        /// As in the native structure.
        pub name: [u8; BLKFILTER_NAME_LENGTH],
        /// As in the native structure.
        pub opt: u64,
        /// As in the native structure.
        pub optlen: u32,
    }

    /// Size of `struct blksnap_cbtinfo` for a 32-bit process: the same
    /// fields without the tail padding.
    pub const CBTINFO_SIZE: usize = 36;

    /// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT` of a 32-bit process.
    pub const IOCTL_BLKSNAP_SNAPSHOT_COLLECT: u32 =
        ior::<BlksnapSnapshotCollect>(BLKSNAP, nr::SNAPSHOT_COLLECT);

    /// `BLKFILTER_ATTACH` of a 32-bit process.
    pub const BLKFILTER_ATTACH: u32 = iowr::<BlkfilterAttach>(0x12, 142);
}
