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
    extra: u32,
) -> Result<KVec<Page>> {
    if len == 0 || len % 512 != 0 || len > pages.len() * PAGE_SIZE {
        return Err(EINVAL);
    }
    // The block layer fails bios that are not on logical blocks with EIO;
    // say why instead.
    let lbs = u64::from(bdev.logical_block_size()).max(512);
    if (sector << 9) % lbs != 0 || len as u64 % lbs != 0 {
        pr_err!(
            "{}: I/O of {} bytes at sector {} is not on logical blocks of {} bytes\n",
            bdev.name(),
            len,
            sector,
            lbs
        );
        return Err(EINVAL);
    }
    let total = pages.len();
    let mut out = KVec::with_capacity(total, GFP_NOIO)?;
    let mut pages = pages.into_iter();
    let mut done = 0usize;
    while done < len {
        let bytes = (len - done).min(BIO_PAGES * PAGE_SIZE);
        let n = bytes.div_ceil(PAGE_SIZE);
        let mut bio = OwnedBio::new(bdev, n as u16, op.raw() | flags::SYNC | extra, GFP_NOIO)?;
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
    transfer(bdev, ReqOp::Read, sector, alloc_pages(len)?, len, bypass, 0)
}

/// Writes `len` bytes of `pages` at `sector` of `bdev`.
pub(crate) fn write_pages(
    bdev: &BlockDevice,
    sector: u64,
    pages: KVec<Page>,
    len: usize,
    bypass: bool,
) -> Result<KVec<Page>> {
    transfer(bdev, ReqOp::Write, sector, pages, len, bypass, 0)
}

/// Writes `len` bytes of `pages` at `sector` of `bdev`, after the writes
/// that completed before it are on stable storage (a preflush), and itself
/// durably (FUA): a commit record. At most one bio's worth.
pub(crate) fn write_pages_durably(
    bdev: &BlockDevice,
    sector: u64,
    pages: KVec<Page>,
    len: usize,
) -> Result<KVec<Page>> {
    if len > BIO_PAGES * PAGE_SIZE {
        return Err(EINVAL);
    }
    transfer(
        bdev,
        ReqOp::Write,
        sector,
        pages,
        len,
        false,
        flags::PREFLUSH | flags::FUA,
    )
}

/// Copies `len` bytes from byte `from` of the pages `src` to byte `to` of
/// the pages `dst`.
pub(crate) fn copy_pages(
    src: &[Page],
    from: usize,
    dst: &mut [Page],
    to: usize,
    len: usize,
) -> Result {
    let mut done = 0;
    while done < len {
        let (s, d) = (from + done, to + done);
        let n = (PAGE_SIZE - s % PAGE_SIZE)
            .min(PAGE_SIZE - d % PAGE_SIZE)
            .min(len - done);
        let src_page = src.get(s / PAGE_SIZE).ok_or(EINVAL)?;
        let dst_page = dst.get_mut(d / PAGE_SIZE).ok_or(EINVAL)?;
        dst_page.copy_from(d % PAGE_SIZE, src_page, s % PAGE_SIZE, n)?;
        done += n;
    }
    Ok(())
}

/// Copies `data` into `pages` from byte `pos`.
pub(crate) fn write_slice_to_pages(pages: &mut [Page], pos: usize, data: &[u8]) -> Result {
    let mut done = 0;
    while done < data.len() {
        let p = pos + done;
        let n = (PAGE_SIZE - p % PAGE_SIZE).min(data.len() - done);
        let page = pages.get_mut(p / PAGE_SIZE).ok_or(EINVAL)?;
        page.write_slice(p % PAGE_SIZE, &data[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Hands the first `len` bytes of `pages` to `out`, a page at a time, with
/// the offset of each piece.
pub(crate) fn read_pages_to(
    pages: &[Page],
    len: usize,
    mut out: impl FnMut(usize, &[u8]) -> Result,
) -> Result {
    let mut buf = KVec::from_elem(0u8, PAGE_SIZE, GFP_NOIO)?;
    let mut done = 0;
    for page in pages {
        if done >= len {
            break;
        }
        let n = (len - done).min(PAGE_SIZE);
        page.read_slice(0, &mut buf[..n])?;
        out(done, &buf[..n])?;
        done += n;
    }
    Ok(())
}
