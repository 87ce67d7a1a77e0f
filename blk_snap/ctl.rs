// SPDX-License-Identifier: GPL-2.0

//! The control device, `/dev/blksnap-control`.

use crate::uapi;
use core::mem::size_of;
use kernel::{
    capability::{capable, Capability},
    error::code::*,
    miscdevice::MiscDevice,
    prelude::*,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

// SAFETY: Four u16 without padding.
unsafe impl AsBytes for uapi::BlksnapVersion {}
// SAFETY: Integers only; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapSnapshotCollect {}

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
            uapi::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => collect(arg),
            _ => {
                pr_err!("unknown control ioctl {:#x}\n", cmd);
                Err(ENOTTY)
            }
        }
    }
}

/// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`: no snapshots exist yet, so the answer is
/// always an empty collection.
fn collect(arg: usize) -> Result<isize> {
    let (mut reader, mut writer) =
        UserSlice::new(arg, size_of::<uapi::BlksnapSnapshotCollect>()).reader_writer();
    let _request: uapi::BlksnapSnapshotCollect = reader.read()?;
    writer.write(&0u32)?;
    Ok(0)
}
