// SPDX-License-Identifier: GPL-2.0

//! A safe, typed interface to the blksnap kernel module.
//!
//! - [`Tracker`]: change tracking on one block device, through the
//!   `BLKFILTER_*` ioctls on the device.
//! - [`Control`]: the control device, `/dev/blksnap-control`.
//!
//! Every error carries the errno and what was attempted.

pub mod backup;
pub mod bench;
pub mod boot;
pub mod digest;
pub mod hooks;
pub mod identity;
pub mod points;
pub mod qcow;
pub mod source;
pub mod stack;

use blk_snap_logic::uapi::{self, ctl};
use nix::errno::Errno;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub use blk_snap_logic::uapi::BLKSNAP_FILTER_NAME as FILTER_NAME;

/// An error: what was attempted, on what, and the errno.
#[derive(Debug)]
pub struct Error {
    /// What was attempted, for example "attach the blksnap filter to /dev/vdb".
    pub what: String,
    /// The error number.
    pub errno: Errno,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({:?})", self.what, self.errno.desc(), self.errno)
    }
}

impl std::error::Error for Error {}

/// Result of this library.
pub type Result<T> = std::result::Result<T, Error>;

fn err(what: impl Into<String>, errno: Errno) -> Error {
    Error {
        what: what.into(),
        errno,
    }
}

fn io_err(what: impl Into<String>, e: std::io::Error) -> Error {
    err(
        what,
        Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio())),
    )
}

fn libc_eio() -> i32 {
    Errno::EIO as i32
}

/// Length of the id of `struct blksnap_cbtpersist`, with its NUL.
pub const CBTPERSIST_ID_LEN: usize = 64;

// The layouts of the persistent CBT interface: sizes and offsets, no hidden
// padding.
const _: () = {
    use std::mem::{offset_of, size_of};
    use uapi::{BlksnapCbtSave, BlksnapCbtStateDevice, BlksnapCbtpersist};
    assert!(size_of::<BlksnapCbtStateDevice>() == 24);
    assert!(offset_of!(BlksnapCbtStateDevice, bdev_path) == 0);
    assert!(offset_of!(BlksnapCbtStateDevice, flags) == 8);
    assert!(offset_of!(BlksnapCbtStateDevice, reserved) == 12);
    assert!(offset_of!(BlksnapCbtStateDevice, records) == 16);
    assert!(offset_of!(BlksnapCbtStateDevice, clean) == 20);
    assert!(size_of::<BlksnapCbtSave>() == 16);
    assert!(offset_of!(BlksnapCbtSave, devices) == 0);
    assert!(offset_of!(BlksnapCbtSave, reserved) == 4);
    assert!(offset_of!(BlksnapCbtSave, bytes) == 8);
    assert!(size_of::<BlksnapCbtpersist>() == 88);
    assert!(size_of::<[u8; CBTPERSIST_ID_LEN]>() == 64);
    assert!(offset_of!(BlksnapCbtpersist, flags) == 64);
    assert!(offset_of!(BlksnapCbtpersist, restored) == 68);
    assert!(offset_of!(BlksnapCbtpersist, generation) == 72);
    assert!(size_of::<uapi::BlksnapCbtpersistFull>() == 232);
    assert!(offset_of!(uapi::BlksnapCbtpersistFull, ext) == 88);
};

/// Raw ioctls, exported for tests that need to send malformed arguments.
pub mod raw {
    use blk_snap_logic::uapi::*;

    nix::ioctl_readwrite_bad!(blkfilter_attach, BLKFILTER_ATTACH, BlkfilterAttach);
    nix::ioctl_readwrite_bad!(blkfilter_detach, BLKFILTER_DETACH, BlkfilterDetach);
    nix::ioctl_readwrite_bad!(blkfilter_ctl, BLKFILTER_CTL, BlkfilterCtl);
    nix::ioctl_read_bad!(blksnap_version, IOCTL_BLKSNAP_VERSION, BlksnapVersion);
    nix::ioctl_read_bad!(
        blksnap_collect,
        IOCTL_BLKSNAP_SNAPSHOT_COLLECT,
        BlksnapSnapshotCollect
    );
    nix::ioctl_readwrite_bad!(
        blksnap_create,
        IOCTL_BLKSNAP_SNAPSHOT_CREATE,
        BlksnapSnapshotCreate
    );
    nix::ioctl_write_ptr_bad!(blksnap_destroy, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, BlksnapUuid);
    nix::ioctl_readwrite_bad!(
        blksnap_create_storage,
        IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE,
        BlksnapSnapshotCreateStorage
    );
    nix::ioctl_write_ptr_bad!(
        blksnap_append_storage,
        IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE,
        BlksnapSnapshotAppendStorage
    );
    nix::ioctl_read_bad!(
        blksnap_wait_event,
        IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT,
        BlksnapSnapshotEvent
    );
    nix::ioctl_write_ptr_bad!(blksnap_take, IOCTL_BLKSNAP_SNAPSHOT_TAKE, BlksnapUuid);
    nix::ioctl_readwrite_bad!(
        blksnap_cbt_state_device,
        IOCTL_BLKSNAP_CBT_STATE_DEVICE,
        BlksnapCbtStateDevice
    );
    nix::ioctl_read_bad!(blksnap_cbt_save, IOCTL_BLKSNAP_CBT_SAVE, BlksnapCbtSave);

    /// A filter name as the ioctls expect it: NUL-padded to 32 bytes.
    pub fn filter_name(name: &str) -> [u8; BLKFILTER_NAME_LENGTH] {
        let mut out = [0u8; BLKFILTER_NAME_LENGTH];
        let n = name.len().min(BLKFILTER_NAME_LENGTH);
        out[..n].copy_from_slice(&name.as_bytes()[..n]);
        out
    }
}

/// Change tracking information of a device (`struct blksnap_cbtinfo`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CbtInfo {
    /// Device size in bytes when tracking started.
    pub device_capacity: u64,
    /// Tracking block size in bytes.
    pub block_size: u32,
    /// Number of tracking blocks.
    pub block_count: u32,
    /// Generation of the change numbers, as a UUID string.
    pub generation: String,
    /// Number of the last snapshot taken in this generation.
    pub changes_number: u8,
}

/// What the fine change map takes (`struct blksnap_cbtfine`'s outputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FineInfo {
    /// Bytes of a fine block.
    pub block_size: u32,
    /// Bytes the device's fine map takes now.
    pub memory: u64,
    /// Bytes it may take.
    pub memory_limit: u64,
}

/// Formats 16 bytes as a UUID string.
pub fn uuid_string(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s += &format!("{byte:02x}");
    }
    s
}

/// Which CBT map to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// As of the last snapshot (`CBTMAP`).
    Snapshot,
    /// Changes as they happen (`CBTMAP_ACTIVE`, our extension).
    Active,
}

/// A range of sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub count: u64,
}

impl SectorRange {
    /// The ranges as the kernel reads them.
    fn to_uapi(ranges: &[Self]) -> Vec<uapi::BlksnapSectors> {
        ranges
            .iter()
            .map(|r| uapi::BlksnapSectors {
                offset: r.offset,
                count: r.count,
            })
            .collect()
    }
}

/// Change tracking on one block device.
pub struct Tracker {
    file: File,
    path: PathBuf,
}

impl Tracker {
    /// Opens the block device at `path` (read-only is enough).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(|e| io_err(format!("open {}", path.display()), e))?;
        Ok(Self { file, path })
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Attaches the blksnap filter: tracking starts with a new generation.
    pub fn attach(&self) -> Result<()> {
        let mut arg = uapi::BlkfilterAttach {
            name: raw::filter_name(FILTER_NAME),
            ..Default::default()
        };
        // SAFETY: `arg` is a valid `struct blkfilter_attach`; no options.
        unsafe { raw::blkfilter_attach(self.file.as_raw_fd(), &mut arg) }.map_err(|e| {
            err(
                format!("attach the blksnap filter to {}", self.path.display()),
                e,
            )
        })?;
        Ok(())
    }

    /// Detaches the blksnap filter: tracking stops and its map is dropped.
    pub fn detach(&self) -> Result<()> {
        let mut arg = uapi::BlkfilterDetach {
            name: raw::filter_name(FILTER_NAME),
        };
        // SAFETY: `arg` is a valid `struct blkfilter_detach`.
        unsafe { raw::blkfilter_detach(self.file.as_raw_fd(), &mut arg) }.map_err(|e| {
            err(
                format!("detach the blksnap filter from {}", self.path.display()),
                e,
            )
        })?;
        Ok(())
    }

    /// Sends a filter command; `buf` is its argument.
    fn ctl(&self, cmd: u32, buf: &mut [u8], what: &str) -> Result<i32> {
        let mut arg = uapi::BlkfilterCtl {
            name: raw::filter_name(FILTER_NAME),
            cmd,
            optlen: buf.len() as u32,
            opt: buf.as_mut_ptr() as u64,
        };
        // SAFETY: `arg` points to `buf`, valid for `optlen` bytes.
        unsafe { raw::blkfilter_ctl(self.file.as_raw_fd(), &mut arg) }
            .map_err(|e| err(format!("{what} of {}", self.path.display()), e))
    }

    /// Returns the change tracking parameters.
    pub fn cbt_info(&self) -> Result<CbtInfo> {
        let mut buf = [0u8; std::mem::size_of::<uapi::BlksnapCbtinfo>()];
        self.ctl(ctl::CBTINFO, &mut buf, "read the CBT information")?;
        let u64_at = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
        Ok(CbtInfo {
            device_capacity: u64_at(0),
            block_size: u32_at(8),
            block_count: u32_at(12),
            generation: uuid_string(buf[16..32].try_into().unwrap()),
            changes_number: buf[32],
        })
    }

    /// Reads `length` bytes of a CBT map from `offset` into `out`.
    pub fn read_cbt_map_range(&self, kind: MapKind, offset: u32, out: &mut [u8]) -> Result<()> {
        let mut arg = uapi::BlksnapCbtmap {
            offset,
            length: out.len() as u32,
            buffer: out.as_mut_ptr() as u64,
        };
        let cmd = match kind {
            MapKind::Snapshot => ctl::CBTMAP,
            MapKind::Active => ctl::CBTMAP_ACTIVE,
        };
        // SAFETY: the struct is plain old data; viewed as bytes for the ioctl.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut arg as *mut uapi::BlksnapCbtmap).cast::<u8>(),
                std::mem::size_of::<uapi::BlksnapCbtmap>(),
            )
        };
        self.ctl(cmd, bytes, "read the CBT map")?;
        Ok(())
    }

    /// Asks the fine change map (our `CBTFINE` extension) about the
    /// `out.len()` fine blocks from `offset`: each byte of `out` becomes
    /// `uapi::fine::CLEAN`, `WRITTEN` or `UNKNOWN` for the writes after the
    /// take numbered `since` up to the last take. `out` may be empty: then
    /// only the information comes back. Fails with `ENOTTY` on a module
    /// without the extension.
    pub fn read_fine(&self, since: u8, offset: u64, out: &mut [u8]) -> Result<FineInfo> {
        let mut arg = uapi::BlksnapCbtfine {
            since,
            offset,
            count: out.len() as u64,
            buffer: out.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: as in `read_cbt_map_range`; the kernel writes the struct
        // back, and `out.len()` bytes at `buffer`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut arg as *mut uapi::BlksnapCbtfine).cast::<u8>(),
                std::mem::size_of::<uapi::BlksnapCbtfine>(),
            )
        };
        self.ctl(ctl::CBTFINE, bytes, "read the fine change map")?;
        Ok(FineInfo {
            block_size: 1 << arg.block_shift,
            memory: arg.memory,
            memory_limit: arg.memory_limit,
        })
    }

    /// Reads a whole CBT map, in pieces of at most 1 MiB.
    pub fn read_cbt_map(&self, kind: MapKind) -> Result<Vec<u8>> {
        let count = self.cbt_info()?.block_count as usize;
        let mut map = vec![0u8; count];
        for (i, piece) in map.chunks_mut(1 << 20).enumerate() {
            self.read_cbt_map_range(kind, (i << 20) as u32, piece)?;
        }
        Ok(map)
    }

    /// Marks sector ranges as changed.
    pub fn mark_dirty(&self, ranges: &[SectorRange]) -> Result<()> {
        let sectors = SectorRange::to_uapi(ranges);
        let mut arg = uapi::BlksnapCbtdirty {
            count: sectors.len() as u32,
            dirty_sectors: sectors.as_ptr() as u64,
        };
        // SAFETY: as in `read_cbt_map_range`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut arg as *mut uapi::BlksnapCbtdirty).cast::<u8>(),
                std::mem::size_of::<uapi::BlksnapCbtdirty>(),
            )
        };
        self.ctl(ctl::CBTDIRTY, bytes, "mark CBT ranges dirty")?;
        Ok(())
    }
}

/// The snapshot state of a device (`struct blksnap_snapshotinfo`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// 0, or the negative errno that made the device's snapshot unusable.
    pub error_code: i32,
    /// Name of the snapshot image device, empty if none.
    pub image: String,
}

impl Tracker {
    /// Adds the device to snapshot `id` (`SNAPSHOTADD`).
    pub fn snapshot_add(&self, id: &SnapshotId) -> Result<()> {
        let mut buf = id.0;
        self.ctl(ctl::SNAPSHOTADD, &mut buf, &format!("add to snapshot {id}"))?;
        Ok(())
    }

    /// Returns the snapshot state of the device (`SNAPSHOTINFO`).
    pub fn snapshot_info(&self) -> Result<SnapshotInfo> {
        let mut buf = [0u8; std::mem::size_of::<uapi::BlksnapSnapshotinfo>()];
        self.ctl(ctl::SNAPSHOTINFO, &mut buf, "read the snapshot state")?;
        let error_code = i32::from_ne_bytes(buf[0..4].try_into().unwrap());
        let name = &buf[4..];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Ok(SnapshotInfo {
            error_code,
            image: String::from_utf8_lossy(&name[..end]).into_owned(),
        })
    }
}

/// What a state device holds ([`Control::cbt_state_device`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StateDevice {
    /// Saved device states read from it.
    pub records: u32,
    /// They were saved clean: usable. Otherwise every one of them is refused.
    pub clean: bool,
}

/// What a save wrote ([`Control::cbt_save`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Saved {
    /// Device states saved.
    pub devices: u32,
    /// Bytes written to the state device.
    pub bytes: u64,
}

/// Whether [`Tracker::persist`] restored a saved CBT state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// The saved state was restored: the CBT map, numbers and generation
    /// are those of the previous boot.
    Restored,
    /// No state was saved under the id.
    NoneSaved,
    /// A state was saved under the id but was refused; [`Restore::reason`]
    /// says why for each errno.
    Refused(Errno),
}

impl Restore {
    /// Decodes `struct blksnap_cbtpersist`'s `restored`.
    pub fn from_raw(restored: i32) -> Option<Self> {
        match restored {
            1 => Some(Self::Restored),
            0 => Some(Self::NoneSaved),
            r if r < 0 => Some(Self::Refused(Errno::from_raw(-r))),
            _ => None,
        }
    }

    /// Why a saved state was refused, in words.
    pub fn reason(errno: Errno) -> String {
        match errno {
            Errno::ESTALE => "not saved clean (a crash, a power cut, a write, detach, snapshot \
                 or CBT change after the save, an earlier boot used it, or the copies of a \
                 mirrored state disagree)"
                .into(),
            Errno::EBUSY => "the device was written before or since the filter was attached \
                 (or a snapshot of it taken): the saved map would miss those writes"
                .into(),
            Errno::EMEDIUMTYPE => "its size or CBT geometry differs from the saved one".into(),
            Errno::EXDEV => "it was saved for another device: the identity (serial, partition, \
                 start) differs"
                .into(),
            Errno::ENOKEY => "nothing proves the device unwritten since the save (no file system \
                 to fingerprint) and the `track` line does not accept that risk"
                .into(),
            Errno::EKEYREJECTED => "its file system changed since the save: something wrote to \
                 it while it was not tracked (another system, a boot without the module, an \
                 edit of a disk image)"
                .into(),
            Errno::EIO => "reading its fingerprint failed".into(),
            e => e.desc().to_string(),
        }
    }
}

/// What proves a device unwritten while it was not tracked
/// (`enum blksnap_cbt_proof`).
pub fn proof_name(proof: u32) -> &'static str {
    blk_snap_logic::fingerprint::Proof::from_u32(proof).name()
}

/// The outcome of [`Tracker::persist`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Persisted {
    /// Whether the saved state was restored.
    pub restored: Restore,
    /// The device's CBT generation after the call.
    pub generation: [u8; 16],
    /// Writes the block layer counted on the device before the call;
    /// `None` if it cannot count them.
    pub writes_before: Option<u64>,
    /// What proves the device unwritten as it is now
    /// (`enum blksnap_cbt_proof`, see [`proof_name`]).
    pub proof: u32,
}

/// An identity as `CBTPERSIST` takes it: at most 127 bytes without a NUL,
/// NUL-padded to 128.
pub fn persist_identity(identity: &str) -> Result<[u8; 128]> {
    let b = identity.as_bytes();
    if b.len() >= 128 || b.contains(&0) {
        return Err(err(
            format!(
                "device identity `{}`: at most 127 bytes without a NUL",
                identity.escape_debug()
            ),
            Errno::EINVAL,
        ));
    }
    let mut out = [0u8; 128];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// A CBT state id as `CBTPERSIST` takes it: 1 to 63 bytes without a NUL,
/// NUL-padded to 64.
pub fn persist_id(id: &str) -> Result<[u8; CBTPERSIST_ID_LEN]> {
    let b = id.as_bytes();
    if b.is_empty() || b.len() >= CBTPERSIST_ID_LEN || b.contains(&0) {
        return Err(err(
            format!(
                "CBT id `{}`: it must be 1 to {} bytes without a NUL",
                id.escape_debug(),
                CBTPERSIST_ID_LEN - 1
            ),
            Errno::EINVAL,
        ));
    }
    let mut out = [0u8; CBTPERSIST_ID_LEN];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

impl Tracker {
    /// Registers the device for [`Control::cbt_save`] under `id` and
    /// restores the CBT state saved under `id` at the last save, if there is
    /// one and it may be used (`CBTPERSIST`). Succeeds whether or not it
    /// restored: [`Persisted::restored`] says. Fails with `ENXIO` when no
    /// state device is open, `EEXIST` when another tracked device has `id`.
    pub fn persist(&self, id: &str) -> Result<Persisted> {
        let identity = identity::Identity::read(&self.path)
            .map(|i| i.text())
            .map_err(|e| {
                err(
                    format!("identity of {}: {e}", self.path.display()),
                    Errno::ENODEV,
                )
            })?;
        self.persist_as(id, &identity, false)
    }

    /// [`Tracker::persist`] with the device identity given and, with
    /// `unverified`, the risk of a restore without a fingerprint accepted.
    pub fn persist_as(&self, id: &str, identity: &str, unverified: bool) -> Result<Persisted> {
        let mut arg = uapi::BlksnapCbtpersistFull {
            v1: uapi::BlksnapCbtpersist {
                id: persist_id(id)?,
                flags: if unverified {
                    uapi::CBTPERSIST_UNVERIFIED
                } else {
                    0
                },
                ..Default::default()
            },
            ext: uapi::BlksnapCbtpersistExt {
                identity: persist_identity(identity)?,
                ..Default::default()
            },
        };
        // SAFETY: as in `read_cbt_map_range`; the struct has no padding and
        // the kernel writes its outputs back.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut arg as *mut uapi::BlksnapCbtpersistFull).cast::<u8>(),
                std::mem::size_of::<uapi::BlksnapCbtpersistFull>(),
            )
        };
        self.ctl(
            ctl::CBTPERSIST,
            bytes,
            &format!("persist the CBT under `{id}`"),
        )?;
        let restored = Restore::from_raw(arg.v1.restored).ok_or_else(|| {
            err(
                format!(
                    "persist the CBT of {} under `{id}`: unexpected answer {}",
                    self.path.display(),
                    arg.v1.restored
                ),
                Errno::EPROTO,
            )
        })?;
        Ok(Persisted {
            restored,
            generation: arg.v1.generation,
            writes_before: (arg.ext.writes_before != u64::MAX).then_some(arg.ext.writes_before),
            proof: arg.ext.proof,
        })
    }
}

/// A snapshot event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Event {
    /// The snapshot of a device became unusable.
    Corrupted {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
        /// The errno, positive (28 for ENOSPC), unlike the negative
        /// [`SnapshotInfo::error_code`].
        errno: i32,
    },
    /// The difference storage is full: a file at its limit, or memory or
    /// device ranges with no room left. Comes at most once per snapshot.
    NoSpace {
        /// The total size of the storage, in sectors.
        requested_sectors: u64,
    },
    /// The difference storage is running low (extension: only for snapshots
    /// created with [`Control::snapshot_create_memory`] or
    /// [`Control::snapshot_create_devices`]).
    LowFreeSpace {
        /// Sectors still free.
        free_sectors: u64,
    },
    /// An event this library does not know.
    Other {
        /// Its code.
        code: u32,
    },
}

impl Event {
    fn decode(code: u32, _time: i64, data: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_ne_bytes(data[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_ne_bytes(data[o..o + 8].try_into().unwrap());
        match code {
            uapi::event::CORRUPTED => Event::Corrupted {
                major: u32_at(0),
                minor: u32_at(4),
                errno: u32_at(8) as i32,
            },
            uapi::event::NO_SPACE => Event::NoSpace {
                requested_sectors: u64_at(0),
            },
            uapi::event::LOW_FREE_SPACE => Event::LowFreeSpace {
                free_sectors: u64_at(0),
            },
            code => Event::Other { code },
        }
    }
}

/// A snapshot identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&uuid_string(&self.0))
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return Err(format!("`{s}` is not a UUID"));
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("`{s}` is not a UUID"))?;
        }
        Ok(Self(b))
    }
}

/// Ranges of consecutive blocks whose change number is greater than `since`.
pub fn changed_ranges(map: &[u8], since: u8) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &n) in map.iter().enumerate() {
        match (n > since, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s as u32, i as u32));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s as u32, map.len() as u32));
    }
    out
}

/// The control device.
pub struct Control {
    file: File,
}

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/blksnap-control";

impl Control {
    /// Opens `/dev/blksnap-control`.
    pub fn open() -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|e| {
                io_err(
                    format!("open {CONTROL_PATH} (is the blksnap module loaded?)"),
                    e,
                )
            })?;
        Ok(Self { file })
    }

    /// Returns the interface version of the module.
    pub fn version(&self) -> Result<uapi::BlksnapVersion> {
        let mut v = uapi::BlksnapVersion::default();
        // SAFETY: `v` is a valid `struct blksnap_version`.
        unsafe { raw::blksnap_version(self.file.as_raw_fd(), &mut v) }
            .map_err(|e| err("read the blksnap version", e))?;
        Ok(v)
    }

    /// Creates a snapshot whose difference storage is `store` (a file, a
    /// directory for an unnamed file, or a block device), at most
    /// `limit_sectors` sectors.
    pub fn snapshot_create(&self, store: &Path, limit_sectors: u64) -> Result<SnapshotId> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(store.as_os_str().as_bytes())
            .map_err(|_| err(format!("store path {}", store.display()), Errno::EINVAL))?;
        let mut arg = uapi::BlksnapSnapshotCreate {
            diff_storage_limit_sect: limit_sectors,
            diff_storage_filename: path.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `arg` is valid and points to the NUL-terminated path.
        unsafe { raw::blksnap_create(self.file.as_raw_fd(), &mut arg) }.map_err(|e| {
            err(
                format!("create a snapshot with storage {}", store.display()),
                e,
            )
        })?;
        Ok(SnapshotId(arg.id.b))
    }

    /// Creates a snapshot whose difference storage is kernel memory of at
    /// most `limit_sectors` sectors.
    pub fn snapshot_create_memory(&self, limit_sectors: u64) -> Result<SnapshotId> {
        self.create_storage(uapi::storage::MEMORY, limit_sectors, "in memory")
    }

    /// Creates a snapshot whose difference storage is block device ranges,
    /// to be added with [`Control::snapshot_append_storage`].
    pub fn snapshot_create_devices(&self) -> Result<SnapshotId> {
        self.create_storage(uapi::storage::DEVICES, 0, "on device ranges")
    }

    fn create_storage(&self, kind: u32, limit: u64, what: &str) -> Result<SnapshotId> {
        let mut arg = uapi::BlksnapSnapshotCreateStorage {
            kind,
            limit_sect: limit,
            ..Default::default()
        };
        // SAFETY: `arg` is valid.
        unsafe { raw::blksnap_create_storage(self.file.as_raw_fd(), &mut arg) }
            .map_err(|e| err(format!("create a snapshot with storage {what}"), e))?;
        Ok(SnapshotId(arg.id.b))
    }

    /// Gives snapshot `id` the sector `ranges` of block device `device` as
    /// difference storage.
    pub fn snapshot_append_storage(
        &self,
        id: &SnapshotId,
        device: &Path,
        ranges: &[SectorRange],
    ) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(device.as_os_str().as_bytes())
            .map_err(|_| err(format!("device path {}", device.display()), Errno::EINVAL))?;
        let sectors = SectorRange::to_uapi(ranges);
        let arg = uapi::BlksnapSnapshotAppendStorage {
            id: uapi::BlksnapUuid { b: id.0 },
            bdev_path: path.as_ptr() as u64,
            count: sectors.len() as u32,
            reserved: 0,
            ranges: sectors.as_ptr() as u64,
        };
        // SAFETY: `arg` points to the path and the ranges, alive here.
        unsafe { raw::blksnap_append_storage(self.file.as_raw_fd(), &arg) }.map_err(|e| {
            err(
                format!("append storage on {} to snapshot {id}", device.display()),
                e,
            )
        })?;
        Ok(())
    }

    /// Waits up to `timeout_ms` for the next event of snapshot `id`.
    /// `None`: no event came in time (`ENOENT`), or a signal interrupted the
    /// wait (`EINTR`). A snapshot that does not exist (any more) gives
    /// `ESRCH`.
    pub fn snapshot_wait_event(&self, id: &SnapshotId, timeout_ms: u32) -> Result<Option<Event>> {
        let mut arg = uapi::BlksnapSnapshotEvent {
            id: uapi::BlksnapUuid { b: id.0 },
            timeout_ms,
            code: 0,
            time_label: 0,
            data: [0; uapi::BLKSNAP_EVENT_SIZE - 32],
        };
        // SAFETY: `arg` is a valid, page-sized event structure.
        match unsafe { raw::blksnap_wait_event(self.file.as_raw_fd(), &mut arg) } {
            Ok(_) => Ok(Some(Event::decode(arg.code, arg.time_label, &arg.data))),
            Err(Errno::ENOENT | Errno::EINTR) => Ok(None),
            Err(e) => Err(err(format!("wait for an event of snapshot {id}"), e)),
        }
    }

    /// Takes snapshot `id`: its images appear.
    pub fn snapshot_take(&self, id: &SnapshotId) -> Result<()> {
        let arg = uapi::BlksnapUuid { b: id.0 };
        // SAFETY: `arg` is a valid UUID.
        unsafe { raw::blksnap_take(self.file.as_raw_fd(), &arg) }
            .map_err(|e| err(format!("take snapshot {id}"), e))?;
        Ok(())
    }

    /// Destroys snapshot `id`: its images and storage go away.
    pub fn snapshot_destroy(&self, id: &SnapshotId) -> Result<()> {
        let arg = uapi::BlksnapUuid { b: id.0 };
        // SAFETY: `arg` is a valid UUID.
        unsafe { raw::blksnap_destroy(self.file.as_raw_fd(), &arg) }
            .map_err(|e| err(format!("destroy snapshot {id}"), e))?;
        Ok(())
    }

    /// Lists the snapshots in creation order: a size query (`ids` 0), then
    /// the ids.
    pub fn snapshot_collect(&self) -> Result<Vec<SnapshotId>> {
        loop {
            let mut arg = uapi::BlksnapSnapshotCollect { count: 0, ids: 0 };
            // SAFETY: `arg` is valid; with `ids` 0 only `count` is written.
            unsafe { raw::blksnap_collect(self.file.as_raw_fd(), &mut arg) }
                .map_err(|e| err("count the snapshots", e))?;
            if arg.count == 0 {
                return Ok(Vec::new());
            }
            let mut ids = vec![uapi::BlksnapUuid::default(); arg.count as usize];
            arg.ids = ids.as_mut_ptr() as u64;
            // SAFETY: `ids` has room for `count` entries.
            match unsafe { raw::blksnap_collect(self.file.as_raw_fd(), &mut arg) } {
                Ok(_) => {
                    ids.truncate(arg.count as usize);
                    return Ok(ids.into_iter().map(|u| SnapshotId(u.b)).collect());
                }
                // More snapshots appeared meanwhile: try again.
                Err(Errno::ENODATA) => continue,
                Err(e) => return Err(err("list the snapshots", e)),
            }
        }
    }

    /// Opens block device `path` as the CBT state device (kept until the
    /// module unloads) and reads the saved states, which are marked not
    /// clean on it at once: they are used at most once. With `format`, an
    /// empty state header is written first. Calling it again with the same
    /// device gives the same answer; another device fails with `EBUSY`, a
    /// device without a state header with `ENODATA`.
    pub fn cbt_state_device(&self, path: &Path, format: bool) -> Result<StateDevice> {
        self.cbt_state_device_as(path, format, false)
    }

    /// [`Control::cbt_state_device`]; with `mirror`, `path` is opened as the
    /// mirror of the state device opened before: every save writes both,
    /// and a state saved on both is restored only where they agree.
    pub fn cbt_state_device_as(
        &self,
        path: &Path,
        format: bool,
        mirror: bool,
    ) -> Result<StateDevice> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| err(format!("device path {}", path.display()), Errno::EINVAL))?;
        let mut flags = if format { uapi::CBT_STATE_FORMAT } else { 0 };
        if mirror {
            flags |= uapi::CBT_STATE_MIRROR;
        }
        let mut arg = uapi::BlksnapCbtStateDevice {
            bdev_path: c_path.as_ptr() as u64,
            flags,
            ..Default::default()
        };
        // SAFETY: `arg` is valid and points to the NUL-terminated path.
        unsafe { raw::blksnap_cbt_state_device(self.file.as_raw_fd(), &mut arg) }.map_err(|e| {
            err(
                format!(
                    "{} {} as the CBT state device{}",
                    if format { "format and open" } else { "open" },
                    path.display(),
                    if mirror { "'s mirror" } else { "" }
                ),
                e,
            )
        })?;
        Ok(StateDevice {
            records: arg.records,
            clean: arg.clean != 0,
        })
    }

    /// Saves the CBT state of every device registered with
    /// [`Tracker::persist`] to the state device, marks it clean and seals
    /// the devices: the first write after it marks the state not clean
    /// before it passes. Fails with `ENXIO` when no state device is open.
    pub fn cbt_save(&self) -> Result<Saved> {
        let mut arg = uapi::BlksnapCbtSave::default();
        // SAFETY: `arg` is a valid `struct blksnap_cbt_save`.
        unsafe { raw::blksnap_cbt_save(self.file.as_raw_fd(), &mut arg) }
            .map_err(|e| err("save the CBT states", e))?;
        Ok(Saved {
            devices: arg.devices,
            bytes: arg.bytes,
        })
    }

    /// The raw file descriptor, for tests.
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_ids_are_1_to_63_bytes_without_nul() {
        assert_eq!(persist_id("").unwrap_err().errno, Errno::EINVAL);
        assert_eq!(persist_id("a\0b").unwrap_err().errno, Errno::EINVAL);
        assert_eq!(
            persist_id(&"x".repeat(64)).unwrap_err().errno,
            Errno::EINVAL
        );
        let long = "y".repeat(63);
        let b = persist_id(&long).unwrap();
        assert_eq!(&b[..63], long.as_bytes());
        assert_eq!(b[63], 0);
        let b = persist_id("/dev/disk/by-id/virtio-xyz").unwrap();
        assert_eq!(&b[..26], b"/dev/disk/by-id/virtio-xyz");
        assert!(b[26..].iter().all(|&c| c == 0));
        // Bytes, not characters: 21 three-byte characters are 63 bytes.
        assert!(persist_id(&"\u{20ac}".repeat(21)).is_ok());
        assert!(persist_id(&"\u{20ac}".repeat(22)).is_err());
    }

    #[test]
    fn persist_ioctl_numbers() {
        // _IOWR('V', 66, 24) and _IOR('V', 67, 16).
        assert_eq!(uapi::IOCTL_BLKSNAP_CBT_STATE_DEVICE, 0xc018_5642);
        assert_eq!(uapi::IOCTL_BLKSNAP_CBT_SAVE, 0x8010_5643);
        assert_eq!(ctl::CBTPERSIST, 130);
        assert_eq!(uapi::CBT_STATE_FORMAT, 1);
    }

    #[test]
    fn restored_values_decode() {
        assert_eq!(Restore::from_raw(1), Some(Restore::Restored));
        assert_eq!(Restore::from_raw(0), Some(Restore::NoneSaved));
        assert_eq!(
            Restore::from_raw(-(Errno::ESTALE as i32)),
            Some(Restore::Refused(Errno::ESTALE))
        );
        assert_eq!(
            Restore::from_raw(-(Errno::EMEDIUMTYPE as i32)),
            Some(Restore::Refused(Errno::EMEDIUMTYPE))
        );
        assert_eq!(Restore::from_raw(2), None);
    }
}
