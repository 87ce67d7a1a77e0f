// SPDX-License-Identifier: GPL-2.0

//! Synchronous page I/O on block devices, for the workers that copy chunks
//! and serve snapshot images.

use kernel::{
    alloc::{flags::GFP_NOIO, KVec},
    block::{
        bdev::BlockDevice,
        bio::{flags, OwnedBio, ReqOp},
    },
    error::code::*,
    page::{Page, PAGE_SIZE},
    prelude::*,
};

/// Pages per bio: 1 MiB with 4 KiB pages.
const BIO_PAGES: usize = 256;

/// Allocates enough pages for `len` bytes.
pub(crate) fn alloc_pages(len: usize) -> Result<KVec<Page>> {
    let n = len.div_ceil(PAGE_SIZE);
    let mut pages = KVec::with_capacity(n, GFP_NOIO)?;
    for _ in 0..n {
        pages.push(Page::alloc_page(GFP_NOIO)?, GFP_NOIO)?;
    }
    Ok(pages)
}

/// Transfers `len` bytes between `pages` and `bdev` at `sector`, in bios of
/// up to [`BIO_PAGES`] pages, and gives the pages back. `bypass` keeps the
/// bios away from the filter attached to `bdev`: for a filter's own I/O.
fn transfer(
    bdev: &BlockDevice,
    op: ReqOp,
    sector: u64,
    pages: KVec<Page>,
    len: usize,
    bypass: bool,
) -> Result<KVec<Page>> {
    if len == 0 || len % 512 != 0 || len > pages.len() * PAGE_SIZE {
        return Err(EINVAL);
    }
    let total = pages.len();
    let mut out = KVec::with_capacity(total, GFP_NOIO)?;
    let mut pages = pages.into_iter();
    let mut done = 0usize;
    while done < len {
        let bytes = (len - done).min(BIO_PAGES * PAGE_SIZE);
        let n = bytes.div_ceil(PAGE_SIZE);
        let mut bio = OwnedBio::new(bdev, n as u16, op.raw() | flags::SYNC, GFP_NOIO)?;
        bio.set_sector(sector + (done >> 9) as u64);
        if bypass {
            bio.bypass_filter();
        }
        let mut left = bytes;
        for page in pages.by_ref().take(n) {
            let piece = left.min(PAGE_SIZE);
            bio.add_page(page, piece as u32, 0)?;
            left -= piece;
        }
        let (result, back) = bio.submit_wait();
        for p in back {
            out.push(p, GFP_NOIO)?;
        }
        result?;
        done += bytes;
    }
    // Pages beyond `len` were not used; hand them back too.
    for p in pages {
        out.push(p, GFP_NOIO)?;
    }
    Ok(out)
}

/// Reads `len` bytes at `sector` of `bdev` into new pages.
pub(crate) fn read_pages(
    bdev: &BlockDevice,
    sector: u64,
    len: usize,
    bypass: bool,
) -> Result<KVec<Page>> {
    transfer(bdev, ReqOp::Read, sector, alloc_pages(len)?, len, bypass)
}

/// Writes `len` bytes of `pages` at `sector` of `bdev`.
pub(crate) fn write_pages(
    bdev: &BlockDevice,
    sector: u64,
    pages: KVec<Page>,
    len: usize,
    bypass: bool,
) -> Result<KVec<Page>> {
    transfer(bdev, ReqOp::Write, sector, pages, len, bypass)
}
