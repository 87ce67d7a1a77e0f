// SPDX-License-Identifier: GPL-2.0

//! The difference storage of a snapshot: where the original contents of the
//! chunks that were overwritten after the snapshot was taken are kept.
//!
//! It is a regular file, grown with fallocate in steps of
//! `diff_storage_minimum` up to the snapshot's limit (an unnamed temporary
//! file when the path is a directory), or a whole block device opened
//! exclusively. Data goes straight to the backing blocks: direct I/O for a
//! file, bios for a block device, never the page cache.

use crate::{
    io, params,
    store::{Alloc, StoreSpace},
};
use kernel::{
    alloc::{flags::GFP_KERNEL, KBox, KVec},
    block::bdev::BlockDevice,
    error::code::*,
    fs::file::{flags::*, File},
    new_mutex,
    page::Page,
    prelude::*,
    str::CStr,
    sync::{Arc, Mutex},
};

enum Backing {
    File(File),
    Bdev {
        file: File,
        // The exclusive holder: a unique address owned by the storage.
        _holder: KBox<u8>,
    },
}

/// The difference storage of one snapshot.
#[pin_data]
pub(crate) struct DiffStorage {
    backing: Backing,
    #[pin]
    space: Mutex<StoreSpace>,
}

/// Why the storage could not provide room.
pub(crate) enum NoRoom {
    /// The storage is full.
    Full,
    /// Growing or another operation failed.
    Error(Error),
}

const PATH_MAX: usize = 4096;

impl DiffStorage {
    /// Opens the storage at `path` with a limit of `limit` sectors.
    pub(crate) fn open(path: &CStr, limit: u64) -> Result<Arc<Self>> {
        let probe = File::open(path, O_LARGEFILE, 0).inspect_err(|e| {
            pr_err!("difference storage {}: cannot open: {:?}\n", path, e);
        })?;
        let (backing, available, limit) = if let Some(_bdev) = probe.bdev() {
            drop(probe);
            let holder = KBox::new(0u8, GFP_KERNEL)?;
            // SAFETY: The holder is a unique allocation owned by the storage,
            // which keeps it until the file is closed.
            let file = unsafe { File::open_bdev(path, (&*holder as *const u8).cast_mut().cast()) }
                .inspect_err(|e| {
                    pr_err!(
                        "difference storage {}: cannot open the block device exclusively: {:?}\n",
                        path,
                        e
                    );
                })?;
            let sectors = file.bdev().map(BlockDevice::nr_sectors).unwrap_or(0);
            (
                Backing::Bdev {
                    file,
                    _holder: holder,
                },
                sectors,
                sectors,
            )
        } else {
            let file = if probe.is_regular() {
                drop(probe);
                File::open(path, O_RDWR | O_LARGEFILE | O_DIRECT, 0)
            } else {
                drop(probe);
                // A directory: an unnamed file that disappears with the snapshot.
                File::open(
                    path,
                    O_TMPFILE | O_RDWR | O_LARGEFILE | O_DIRECT | O_EXCL,
                    0o600,
                )
            }
            .inspect_err(|e| {
                pr_err!(
                    "difference storage {}: cannot open for direct I/O: {:?}\n",
                    path,
                    e
                );
            })?;
            let sectors = file.size() >> 9;
            (Backing::File(file), sectors, limit.max(sectors))
        };
        if limit == 0 {
            pr_err!("difference storage {}: no space and a limit of 0\n", path);
            return Err(EINVAL);
        }
        let step = u64::from(params::diff_storage_minimum.get()).max(1);
        let space = StoreSpace::new(available, limit, step);
        Arc::pin_init(
            try_pin_init!(Self {
                backing,
                space <- new_mutex!(space, "DiffStorage::space"),
            }),
            GFP_KERNEL,
        )
    }

    /// The block device that holds the storage, if it is on one.
    pub(crate) fn bdev(&self) -> Option<&BlockDevice> {
        match &self.backing {
            Backing::File(f) => f.fs_bdev(),
            Backing::Bdev { file, .. } => file.bdev(),
        }
    }

    /// Allocates `sectors` sectors, growing the file if needed and allowed.
    pub(crate) fn alloc(&self, sectors: u64) -> core::result::Result<u64, NoRoom> {
        let mut space = self.space.lock();
        loop {
            match space.alloc(sectors) {
                Ok(offset) => return Ok(offset),
                Err(Alloc::Full) => return Err(NoRoom::Full),
                Err(Alloc::Grow(to)) => {
                    let Backing::File(file) = &self.backing else {
                        return Err(NoRoom::Full);
                    };
                    let from = space.available;
                    file.allocate(from << 9, (to - from) << 9).map_err(|e| {
                        pr_err!(
                            "difference storage: growing to {} sectors failed: {:?}\n",
                            to,
                            e
                        );
                        NoRoom::Error(e)
                    })?;
                    pr_info!("difference storage grew to {} MiB\n", to >> 11);
                    space.grown(to);
                }
            }
        }
    }

    /// Writes `len` bytes of `pages` at `sector`.
    pub(crate) fn write(&self, sector: u64, pages: KVec<Page>, len: usize) -> Result<KVec<Page>> {
        match &self.backing {
            Backing::File(f) => {
                f.write_pages_at(sector << 9, &pages, len)?;
                Ok(pages)
            }
            Backing::Bdev { file, .. } => {
                io::write_pages(bdev_of(file)?, sector, pages, len, false)
            }
        }
    }

    /// Reads `len` bytes at `sector` into new pages.
    pub(crate) fn read(&self, sector: u64, len: usize) -> Result<KVec<Page>> {
        match &self.backing {
            Backing::File(f) => {
                let mut pages = io::alloc_pages(len)?;
                f.read_pages_at(sector << 9, &mut pages, len)?;
                Ok(pages)
            }
            Backing::Bdev { file, .. } => io::read_pages(bdev_of(file)?, sector, len, false),
        }
    }

    /// Sectors used and sectors that exist now.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let s = self.space.lock();
        (s.used, s.available)
    }
}

fn bdev_of(file: &File) -> Result<&BlockDevice> {
    file.bdev().ok_or(EINVAL)
}

/// Reads a path argument of an ioctl from user space.
pub(crate) fn read_path(ptr: usize) -> Result<KVec<u8>> {
    let mut buf = KVec::from_elem(0u8, PATH_MAX, GFP_KERNEL)?;
    let path = kernel::uaccess::UserSlice::new(ptr, PATH_MAX)
        .reader()
        .read_cstr(&mut buf)?;
    if path.is_empty() {
        return Err(EINVAL);
    }
    // Keep the terminating NUL, so that the result converts to a `CStr`.
    let mut out = KVec::with_capacity(path.len() + 1, GFP_KERNEL)?;
    out.extend_from_slice(path, GFP_KERNEL)?;
    out.push(0, GFP_KERNEL)?;
    Ok(out)
}
