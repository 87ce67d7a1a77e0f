// SPDX-License-Identifier: GPL-2.0

//! Snapshot images: one block device per snapshotted device,
//! `/dev/blk-snap-imageN`, with the size and block sizes of the original.
//! Reads and writes are served by the device's difference area, in work
//! items on the image queue; writes land in the difference storage, never on
//! the device.

use crate::diff_area::DiffArea;
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::{
    alloc::{
        flags::{GFP_KERNEL, GFP_NOIO},
        KVec,
    },
    block::{
        bdev::BlockDevice,
        bio::{InFlightBio, ReqOp},
        disk::{Disk, DiskCount, DiskOperations, DiskParams},
    },
    error::code::*,
    new_mutex,
    prelude::*,
    sync::{Arc, Mutex},
    ThisModule,
};

/// Which image numbers are in use.
///
/// A number is taken when its snapshot is taken and free again when the
/// image's data is freed: after its disk was deleted and its last opener
/// closed it. So a name is never reused while a disk of that name, deleted
/// or not, may still exist: adding a disk of a name that exists fails.
#[pin_data]
pub(crate) struct ImageSlots {
    #[pin]
    used: Mutex<KVec<bool>>,
}

impl ImageSlots {
    /// No number in use.
    pub(crate) fn new() -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Self {
                used <- new_mutex!(KVec::new(), "ImageSlots::used"),
            }),
            GFP_KERNEL,
        )
    }

    /// Takes the lowest free number.
    pub(crate) fn alloc(self: &Arc<Self>) -> Result<Slot> {
        let mut used = self.used.lock();
        let index = match used.iter().position(|u| !u) {
            Some(i) => {
                used[i] = true;
                i
            }
            None => {
                used.push(true, GFP_KERNEL)?;
                used.len() - 1
            }
        };
        Ok(Slot {
            slots: self.clone(),
            index: index as u32,
            freed: AtomicBool::new(false),
        })
    }
}

/// An image number in use; free again when this is dropped. Whoever holds
/// it owns the name: every path that gives up an image, or fails to create
/// one, frees it by dropping this.
pub(crate) struct Slot {
    slots: Arc<ImageSlots>,
    index: u32,
    freed: AtomicBool,
}

impl Slot {
    /// N of `blk-snap-imageN`.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// Frees the number now, once: for a disk that was never added, whose
    /// name therefore does not exist.
    fn release(&self) {
        if !self.freed.swap(true, Ordering::AcqRel) {
            if let Some(u) = self.slots.used.lock().get_mut(self.index as usize) {
                *u = false;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

/// What an image needs to serve I/O.
pub(crate) struct ImageData {
    area: Arc<DiffArea>,
    /// The image's number, in use until this data is freed: after the
    /// disk was deleted and its last opener closed it.
    slot: Slot,
}

/// The largest I/O the image takes, in sectors (1 MiB) if its chunks are
/// smaller: larger bios are cut at chunk borders anyway.
const MAX_IO_SECTORS: u32 = 2048;

/// The image block device's operations.
pub(crate) struct ImageOps;

#[vtable]
impl DiskOperations for ImageOps {
    type Data = ImageData;

    fn submit_bio(data: &Arc<ImageData>, bio: InFlightBio) {
        // Cut at chunk borders and the other limits of the image.
        let Some(bio) = bio.split_to_limits() else {
            return;
        };
        match bio.op() {
            ReqOp::Read => data.area.submit_image_read(bio),
            // Storage writes are synchronous: a flush has nothing to do.
            ReqOp::Write if bio.sectors() == 0 => bio.end(Ok(())),
            ReqOp::Flush => bio.end(Ok(())),
            ReqOp::Write => data.area.queue_image_write(bio),
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
    /// Creates `/dev/blk-snap-imageN` for the device `orig`, N being
    /// `slot`'s number, which the image holds until its data is freed.
    pub(crate) fn new(
        slot: Slot,
        orig: &BlockDevice,
        area: Arc<DiffArea>,
        module: &'static ThisModule,
        disks: Pin<&DiskCount>,
    ) -> Result<Self> {
        let index = slot.index();
        let capacity_sectors = area.geometry().capacity_sectors;
        let chunk_sectors = u32::try_from(area.geometry().chunk_sectors()).map_err(|_| EINVAL)?;
        let data = Arc::new(ImageData { area, slot }, GFP_NOIO)?;
        // The module's exit waits for `disks`: an image's data may be freed
        // after its last opener closed it, long after destroy.
        let disk = Disk::<ImageOps>::new(
            DiskParams {
                name: format_args!("blk-snap-image{}", index),
                capacity_sectors,
                logical_block_size: orig.logical_block_size(),
                physical_block_size: orig.physical_block_size(),
                read_only: false,
                // Reads go on to the device or the storage a chunk at most
                // at a time: let them come as large as that.
                max_sectors: chunk_sectors.max(MAX_IO_SECTORS),
                chunk_sectors,
                io_opt: chunk_sectors << 9,
            },
            data.clone(),
            module,
            disks,
        )
        .inspect_err(|_| {
            // The disk was not added: its name is free now, even if the
            // data were not freed with the disk.
            data.slot.release();
        })?;
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
