// SPDX-License-Identifier: GPL-2.0

//! Snapshot images: one block device per snapshotted device,
//! `/dev/blk-snap-imageN`, with the size and block sizes of the original.
//! Reads and writes are served by the device's difference area, in work
//! items; writes land in the difference storage, never on the device.

use crate::{diff_area::DiffArea, snapshot::globals};
use kernel::{
    alloc::flags::GFP_NOIO,
    block::{
        bdev::BlockDevice,
        bio::{InFlightBio, ReqOp},
        disk::{Disk, DiskOperations, DiskParams},
    },
    error::code::*,
    prelude::*,
    sync::Arc,
};

/// What an image needs to serve reads.
pub(crate) struct ImageData {
    area: Arc<DiffArea>,
}

/// The image block device's operations.
pub(crate) struct ImageOps;

#[vtable]
impl DiskOperations for ImageOps {
    type Data = ImageData;

    fn submit_bio(data: &Arc<ImageData>, bio: InFlightBio) {
        match bio.op() {
            ReqOp::Read => {
                let data = data.clone();
                let spawned = globals().wq.try_spawn(GFP_NOIO, move || {
                    let mut bio = bio;
                    let result = data.area.read_image(&mut bio);
                    bio.end(result);
                });
                if let Err(e) = spawned {
                    // The closure, and the bio with it, was dropped: its
                    // drop fails the bio.
                    pr_err!("image read: {:?}\n", e);
                }
            }
            // Storage writes are synchronous: a flush has nothing to do.
            ReqOp::Write if bio.sectors() == 0 => bio.end(Ok(())),
            ReqOp::Flush => bio.end(Ok(())),
            ReqOp::Write => {
                let data = data.clone();
                let spawned = globals().wq.try_spawn(GFP_NOIO, move || {
                    let result = data.area.write_image(&bio);
                    bio.end(result);
                });
                if let Err(e) = spawned {
                    pr_err!("image write: {:?}\n", e);
                }
            }
            _ => bio.end(Err(EOPNOTSUPP)),
        }
    }
}

/// A snapshot image block device.
pub(crate) struct Image {
    disk: Disk<ImageOps>,
    index: u32,
}

impl Image {
    /// Creates `/dev/blk-snap-image<index>` for the device `orig`.
    pub(crate) fn new(index: u32, orig: &BlockDevice, area: Arc<DiffArea>) -> Result<Self> {
        let capacity_sectors = area.geometry().capacity_sectors;
        let data = Arc::new(ImageData { area }, GFP_NOIO)?;
        // The module's exit waits for this count: an image's data may be
        // freed after its last opener closed it, long after destroy.
        let disk = Disk::<ImageOps>::new(
            DiskParams {
                name: format_args!("blk-snap-image{}", index),
                capacity_sectors,
                logical_block_size: orig.logical_block_size(),
                physical_block_size: orig.physical_block_size(),
                read_only: false,
            },
            data,
            globals().module,
            globals().disks(),
        )?;
        Ok(Self { disk, index })
    }

    /// The image's index, N in `blk-snap-imageN`.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// The image's device name.
    pub(crate) fn name(&self) -> &CStr {
        self.disk.name()
    }

    /// Number of openers of the image.
    pub(crate) fn openers(&self) -> u32 {
        self.disk.openers()
    }
}
