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
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotCreate {}
// SAFETY: 16 bytes.
unsafe impl FromBytes for uapi::BlksnapUuid {}
// SAFETY: 16 bytes, no padding.
unsafe impl AsBytes for uapi::BlksnapUuid {}

/// The control device's operations.
pub(crate) struct Control;

#[vtable]
impl MiscDevice for Control {
    type Ptr = ();

    fn open() -> Result<()> {
        Ok(())
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
            uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => collect(arg),
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

/// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`: with a `count` too small for all
/// snapshots, copies nothing, sets `count` to the number needed and fails
/// with `ENODATA`.
fn collect(arg: usize) -> Result<isize> {
    let (mut reader, mut writer) =
        UserSlice::new(arg, size_of::<uapi::BlksnapSnapshotCollect>()).reader_writer();
    let req: uapi::BlksnapSnapshotCollect = reader.read()?;
    let ids = Snapshot::collect()?;
    let n = ids.len() as u32;
    writer.write(&n)?;
    if n > req.count {
        return Err(ENODATA);
    }
    let mut out =
        UserSlice::new(req.ids as usize, ids.len() * size_of::<uapi::BlksnapUuid>()).writer();
    for id in ids.iter() {
        out.write(&uapi::BlksnapUuid { b: id.0 })?;
    }
    Ok(0)
}
