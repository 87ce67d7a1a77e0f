// SPDX-License-Identifier: GPL-2.0

//! The control device, `/dev/blksnap-control`.

use crate::{diff_storage::read_path, snapshot::Snapshot, uapi};
use core::mem::size_of;
use kernel::{
    capability::{capable, Capability},
    error::code::*,
    miscdevice::MiscDevice,
    prelude::*,
    str::CStr,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
    uuid::Uuid,
};

// SAFETY: Four u16 without padding.
unsafe impl AsBytes for uapi::BlksnapVersion {}
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotCollect {}
// SAFETY: Integers only, packed: no padding, any bit pattern is valid.
unsafe impl FromBytes for uapi::compat::BlksnapSnapshotCollect {}
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotCreate {}
// SAFETY: 16 bytes.
unsafe impl FromBytes for uapi::BlksnapUuid {}
// SAFETY: 16 bytes, no padding.
unsafe impl AsBytes for uapi::BlksnapUuid {}
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotCreateStorage {}
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotAppendStorage {}
// SAFETY: A u64 and four u32: 24 bytes without padding; any bit pattern is
// valid.
unsafe impl FromBytes for uapi::BlksnapCbtStateDevice {}
// SAFETY: As above.
unsafe impl AsBytes for uapi::BlksnapCbtStateDevice {}
// SAFETY: Two u32 and a u64: 16 bytes without padding.
unsafe impl AsBytes for uapi::BlksnapCbtSave {}

/// The control device's operations.
pub(crate) struct Control;

/// How the caller lays out its structures.
#[derive(Clone, Copy)]
enum Layout {
    /// As this kernel.
    Native,
    /// As a 32-bit x86 process: a `__u64` is only 4-byte aligned.
    Compat,
}

#[vtable]
impl MiscDevice for Control {
    type Ptr = ();

    fn open() -> Result<()> {
        Ok(())
    }

    /// A 32-bit process on a 64-bit kernel: only `SNAPSHOT_COLLECT` is laid
    /// out differently (and so has another number); the others are the same.
    fn compat_ioctl(device: (), cmd: u32, arg: usize) -> Result<isize> {
        if cmd == uapi::compat::IOCTL_BLKSNAP_SNAPSHOT_COLLECT {
            if !capable(Capability::SYS_ADMIN) {
                pr_err!("control ioctl {:#x} needs CAP_SYS_ADMIN\n", cmd);
                return Err(EPERM);
            }
            return collect(arg, Layout::Compat);
        }
        Self::ioctl(device, cmd, arg)
    }

    fn ioctl(_device: (), cmd: u32, arg: usize) -> Result<isize> {
        if !capable(Capability::SYS_ADMIN) {
            pr_err!("control ioctl {:#x} needs CAP_SYS_ADMIN\n", cmd);
            return Err(EPERM);
        }
        match cmd {
            uapi::IOCTL_BLKSNAP_VERSION => {
                UserSlice::new(arg, size_of::<uapi::BlksnapVersion>())
                    .writer()
                    .write(&uapi::VERSION)?;
                Ok(0)
            }
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE => create(arg),
            uapi::IOCTL_BLKSNAP_SNAPSHOT_DESTROY => {
                Snapshot::remove(&read_id(arg)?)?;
                Ok(0)
            }
            uapi::IOCTL_BLKSNAP_SNAPSHOT_TAKE => {
                Snapshot::find(&read_id(arg)?)?.take()?;
                Ok(0)
            }
            uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => collect(arg, Layout::Native),
            uapi::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT => wait_event(arg),
            uapi::IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE => create_storage(arg),
            uapi::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE => append_storage(arg),
            uapi::IOCTL_BLKSNAP_CBT_STATE_DEVICE => cbt_state_device(arg),
            uapi::IOCTL_BLKSNAP_CBT_SAVE => {
                let (devices, bytes) = crate::snapshot::save_cbt()?;
                UserSlice::new(arg, size_of::<uapi::BlksnapCbtSave>())
                    .writer()
                    .write(&uapi::BlksnapCbtSave {
                        devices,
                        reserved: 0,
                        bytes,
                    })?;
                Ok(0)
            }
            _ => {
                pr_err!("unknown control ioctl {:#x}\n", cmd);
                Err(ENOTTY)
            }
        }
    }
}

fn read_id(arg: usize) -> Result<Uuid> {
    let id: uapi::BlksnapUuid = UserSlice::new(arg, size_of::<uapi::BlksnapUuid>())
        .reader()
        .read()?;
    Ok(Uuid(id.b))
}

/// `IOCTL_BLKSNAP_SNAPSHOT_CREATE`.
fn create(arg: usize) -> Result<isize> {
    let size = size_of::<uapi::BlksnapSnapshotCreate>();
    let req: uapi::BlksnapSnapshotCreate = UserSlice::new(arg, size).reader().read()?;
    let path = read_path(req.diff_storage_filename as usize)?;
    let path = CStr::from_bytes_with_nul(&path)?;
    let id = Snapshot::create(path, req.diff_storage_limit_sect)?;
    let id_offset = core::mem::offset_of!(uapi::BlksnapSnapshotCreate, id);
    let out = UserSlice::new(arg + id_offset, size_of::<uapi::BlksnapUuid>()).writer();
    if let Err(e) = {
        let mut out = out;
        out.write(&uapi::BlksnapUuid { b: id.0 })
    } {
        // User space cannot learn the id: do not leave the snapshot behind.
        let _ = Snapshot::remove(&id);
        return Err(e);
    }
    Ok(0)
}

/// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`. With `ids` 0, a size query as
/// upstream: sets `count` to the number of snapshots and succeeds, whatever
/// `count` was. Otherwise fills `ids` in creation order and sets `count` to
/// the number written; with a `count` too small for all snapshots, copies
/// nothing, sets `count` to the number needed and fails with `ENODATA`.
fn collect(arg: usize, layout: Layout) -> Result<isize> {
    let req = match layout {
        Layout::Native => UserSlice::new(arg, size_of::<uapi::BlksnapSnapshotCollect>())
            .reader()
            .read::<uapi::BlksnapSnapshotCollect>()?,
        Layout::Compat => {
            let c: uapi::compat::BlksnapSnapshotCollect =
                UserSlice::new(arg, size_of::<uapi::compat::BlksnapSnapshotCollect>())
                    .reader()
                    .read()?;
            uapi::BlksnapSnapshotCollect {
                count: c.count,
                ids: c.ids,
            }
        }
    };
    // `count` comes first in both layouts.
    let mut writer = UserSlice::new(arg, size_of::<u32>()).writer();
    let ids = Snapshot::collect()?;
    let n = ids.len() as u32;
    writer.write(&n)?;
    if req.ids == 0 {
        return Ok(0);
    }
    if n > req.count {
        pr_err!(
            "collect: room for {} snapshot ids, {} needed\n",
            req.count,
            n
        );
        return Err(ENODATA);
    }
    let mut out =
        UserSlice::new(req.ids as usize, ids.len() * size_of::<uapi::BlksnapUuid>()).writer();
    for id in ids.iter() {
        out.write(&uapi::BlksnapUuid { b: id.0 })?;
    }
    Ok(0)
}

/// Writes a new snapshot's id at `arg + offset`; removes the snapshot if
/// user space cannot learn it.
fn return_id(arg: usize, offset: usize, id: Uuid) -> Result<isize> {
    let mut out = UserSlice::new(arg + offset, size_of::<uapi::BlksnapUuid>()).writer();
    if let Err(e) = out.write(&uapi::BlksnapUuid { b: id.0 }) {
        let _ = Snapshot::remove(&id);
        return Err(e);
    }
    Ok(0)
}

/// `IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE` (extension).
fn create_storage(arg: usize) -> Result<isize> {
    let size = size_of::<uapi::BlksnapSnapshotCreateStorage>();
    let req: uapi::BlksnapSnapshotCreateStorage = UserSlice::new(arg, size).reader().read()?;
    if req.flags != 0 {
        pr_err!("create storage: unknown flags {:#x}\n", req.flags);
        return Err(EINVAL);
    }
    let id = Snapshot::create_kind(req.kind, req.limit_sect)?;
    return_id(
        arg,
        core::mem::offset_of!(uapi::BlksnapSnapshotCreateStorage, id),
        id,
    )
}

/// `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE` (extension).
fn append_storage(arg: usize) -> Result<isize> {
    let size = size_of::<uapi::BlksnapSnapshotAppendStorage>();
    let req: uapi::BlksnapSnapshotAppendStorage = UserSlice::new(arg, size).reader().read()?;
    if req.count == 0 || req.count > uapi::APPEND_MAX_RANGES || req.reserved != 0 {
        pr_err!(
            "append storage: {} ranges, not 1 to {}\n",
            req.count,
            uapi::APPEND_MAX_RANGES
        );
        return Err(if req.count > uapi::APPEND_MAX_RANGES {
            E2BIG
        } else {
            EINVAL
        });
    }
    let path = read_path(req.bdev_path as usize)?;
    let path = CStr::from_bytes_with_nul(&path)?;
    let n = req.count as usize;
    let mut reader =
        UserSlice::new(req.ranges as usize, n * size_of::<uapi::BlksnapSectors>()).reader();
    let mut ranges = kernel::alloc::KVec::with_capacity(n, kernel::alloc::flags::GFP_KERNEL)?;
    for _ in 0..n {
        let r: uapi::BlksnapSectors = reader.read()?;
        ranges.push((r.offset, r.count), kernel::alloc::flags::GFP_KERNEL)?;
    }
    Snapshot::find(&Uuid(req.id.b))?.append_storage(path, &ranges)?;
    Ok(0)
}

/// `IOCTL_BLKSNAP_CBT_STATE_DEVICE`.
fn cbt_state_device(arg: usize) -> Result<isize> {
    let size = size_of::<uapi::BlksnapCbtStateDevice>();
    let (mut reader, mut writer) = UserSlice::new(arg, size).reader_writer();
    let mut req: uapi::BlksnapCbtStateDevice = reader.read()?;
    if req.flags & !(uapi::CBT_STATE_FORMAT | uapi::CBT_STATE_MIRROR) != 0 || req.reserved != 0 {
        pr_err!(
            "CBT state device: flags {:#x}, reserved {} (must be 0)\n",
            req.flags,
            req.reserved
        );
        return Err(EINVAL);
    }
    let path = read_path(req.bdev_path as usize)?;
    let path = CStr::from_bytes_with_nul(&path)?;
    let format = req.flags & uapi::CBT_STATE_FORMAT != 0;
    let mirror = req.flags & uapi::CBT_STATE_MIRROR != 0;
    let (records, clean) = crate::snapshot::globals()?
        .persist()
        .open(path, format, mirror)?;
    req.records = records;
    req.clean = u32::from(clean);
    writer.write(&req)?;
    Ok(0)
}

/// Offset of `code` in `struct blksnap_snapshot_event`: what comes before
/// it, the id and the timeout, is input only.
const EVENT_OUT: usize = core::mem::offset_of!(uapi::BlksnapSnapshotEvent, code);
/// Size of the data area of `struct blksnap_snapshot_event`.
const EVENT_DATA: usize = uapi::BLKSNAP_EVENT_SIZE - 32;
/// Zeroes for the rest of the data area after an event's payload.
static ZEROES: [u8; EVENT_DATA - crate::event_queue::PAYLOAD] =
    [0; EVENT_DATA - crate::event_queue::PAYLOAD];

/// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`: reads the id and the timeout, waits,
/// and writes the code, the time and the data area back: the payload at its
/// start, zeroes after it. As upstream: the id and the timeout are left as
/// they were, and nothing is written when no event came (`ENOENT`) or a
/// signal interrupted the wait (`EINTR`).
fn wait_event(arg: usize) -> Result<isize> {
    let mut head = UserSlice::new(arg, EVENT_OUT).reader();
    let id: uapi::BlksnapUuid = head.read()?;
    let timeout_ms: u32 = head.read()?;
    let snapshot = Snapshot::find(&Uuid(id.b))?;
    let event = snapshot.wait_event(timeout_ms)?;
    let mut out = UserSlice::new(arg + EVENT_OUT, uapi::BLKSNAP_EVENT_SIZE - EVENT_OUT).writer();
    out.write(&event.code)?;
    out.write(&event.time_ns)?;
    out.write_slice(&event.data)?;
    out.write_slice(&ZEROES)?;
    Ok(0)
}
