// SPDX-License-Identifier: GPL-2.0

//! The difference storage of a snapshot: where the original contents of the
//! chunks that were overwritten after the snapshot was taken are kept.
//!
//! Three kinds:
//!
//! - a regular file, grown with fallocate in steps of `diff_storage_minimum`
//!   up to the snapshot's limit (an unnamed temporary file when the path is a
//!   directory), or a whole block device opened exclusively;
//! - memory: kernel pages, up to the limit;
//! - ranges of block devices that user space appends, before or after the
//!   snapshot is taken.
//!
//! Data goes straight to the backing blocks: direct I/O for a file, bios for
//! block devices, never a page cache. Chunks are placed one after another;
//! a chunk never straddles two ranges. When the free space drops below half
//! of `diff_storage_minimum`, a `low_free_space` event tells user space to
//! append storage in time (only for snapshots created through our extension
//! ioctl; upstream clients get upstream's `no_space` when a file reaches its
//! limit).
//!
//! Addresses handed out are sectors of a virtual space in which the ranges
//! follow one another.

use crate::{
    event_queue::EventQueue,
    io, params,
    store::{free_from, place, Cursor},
    uapi,
};
use kernel::{
    alloc::{
        flags::{GFP_KERNEL, GFP_NOIO},
        KBox, KVec,
    },
    block::bdev::BlockDevice,
    error::code::*,
    fs::file::{flags::*, File},
    new_mutex,
    page::{Page, PAGE_SIZE},
    prelude::*,
    rbtree::RBTree,
    str::CStr,
    sync::{Arc, Mutex},
};

/// A block device opened exclusively for the storage.
struct Device {
    file: File,
    // The exclusive holder: a unique address owned by the storage.
    _holder: KBox<u8>,
}

impl Device {
    fn open(path: &CStr) -> Result<Self> {
        let holder = KBox::new(0u8, GFP_KERNEL)?;
        // SAFETY: The holder is a unique allocation kept until the file is
        // closed, as the device is dropped before it.
        let file = unsafe { File::open_bdev(path, (&*holder as *const u8).cast_mut().cast()) }
            .inspect_err(|e| {
                pr_err!(
                    "storage device {}: cannot open exclusively: {:?}\n",
                    path,
                    e
                );
            })?;
        if file.bdev().is_none() {
            return Err(ENOTBLK);
        }
        Ok(Self {
            file,
            _holder: holder,
        })
    }

    fn bdev(&self) -> &BlockDevice {
        // Checked in `open`.
        self.file.bdev().unwrap_or_else(|| unreachable!())
    }
}

/// Where the data of one range lives.
enum Target {
    /// The storage file, from sector 0.
    File,
    /// Memory pages.
    Memory,
    /// A block device, from sector `start`.
    Device { dev: Arc<Device>, start: u64 },
}

struct Range {
    target: Target,
    len: u64,
}

/// The storage kind, with what it needs beyond the ranges.
enum Kind {
    File(File),
    Memory,
    Devices,
}

struct Space {
    ranges: KVec<Range>,
    /// The lengths of `ranges`, for [`place`].
    lengths: KVec<u64>,
    /// For memory: the pages, by page index of the address.
    mem: RBTree<u64, Page>,
    cursor: Cursor,
    used: u64,
    /// For a file: the size it may grow to.
    limit: u64,
    /// `low_free_space` was signalled and not re-armed by an append.
    low_signalled: bool,
    /// `no_space` was signalled: it comes at most once per snapshot.
    no_space_signalled: bool,
}

/// Why the storage could not provide room.
pub(crate) enum NoRoom {
    /// The storage is full.
    Full,
    /// Growing, or another operation, failed.
    Error(Error),
}

/// The difference storage of one snapshot.
#[pin_data]
pub(crate) struct DiffStorage {
    kind: Kind,
    events: Arc<EventQueue>,
    /// The device the storage is on, if one: it cannot be snapshotted.
    home: Option<kernel::types::ARef<BlockDevice>>,
    #[pin]
    space: Mutex<Space>,
}

const PATH_MAX: usize = 4096;

impl DiffStorage {
    /// Opens the storage at `path`: a file, a directory or a block device,
    /// with a limit of `limit` sectors.
    pub(crate) fn open(path: &CStr, limit: u64, events: Arc<EventQueue>) -> Result<Arc<Self>> {
        let probe = File::open(path, O_LARGEFILE, 0).inspect_err(|e| {
            pr_err!("difference storage {}: cannot open: {:?}\n", path, e);
        })?;
        if probe.bdev().is_some() {
            drop(probe);
            let dev = Arc::new(Device::open(path)?, GFP_KERNEL)?;
            let sectors = dev.bdev().nr_sectors();
            let home = Some(kernel::types::ARef::from(dev.bdev()));
            let mut ranges = KVec::new();
            ranges.push(
                Range {
                    target: Target::Device { dev, start: 0 },
                    len: sectors,
                },
                GFP_KERNEL,
            )?;
            return Self::new(Kind::Devices, events, home, ranges, sectors);
        }
        let home = probe.fs_bdev().map(kernel::types::ARef::from);
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
        let limit = limit.max(sectors);
        if limit == 0 {
            pr_err!("difference storage {}: no space and a limit of 0\n", path);
            return Err(EINVAL);
        }
        let mut ranges = KVec::new();
        ranges.push(
            Range {
                target: Target::File,
                len: sectors,
            },
            GFP_KERNEL,
        )?;
        Self::new(Kind::File(file), events, home, ranges, limit)
    }

    /// A storage in memory of up to `limit` sectors.
    pub(crate) fn memory(limit: u64, events: Arc<EventQueue>) -> Result<Arc<Self>> {
        let mut ranges = KVec::new();
        ranges.push(
            Range {
                target: Target::Memory,
                len: limit,
            },
            GFP_KERNEL,
        )?;
        Self::new(Kind::Memory, events, None, ranges, limit)
    }

    /// A storage of block device ranges, empty until ranges are appended.
    pub(crate) fn devices(events: Arc<EventQueue>) -> Result<Arc<Self>> {
        Self::new(Kind::Devices, events, None, KVec::new(), 0)
    }

    fn new(
        kind: Kind,
        events: Arc<EventQueue>,
        home: Option<kernel::types::ARef<BlockDevice>>,
        ranges: KVec<Range>,
        limit: u64,
    ) -> Result<Arc<Self>> {
        let mut lengths = KVec::with_capacity(ranges.len(), GFP_KERNEL)?;
        for r in ranges.iter() {
            lengths.push(r.len, GFP_KERNEL)?;
        }
        Arc::pin_init(
            try_pin_init!(Self {
                kind,
                events,
                home,
                space <- new_mutex!(Space {
                    ranges,
                    lengths,
                    mem: RBTree::new(),
                    cursor: Cursor::default(),
                    used: 0,
                    limit,
                    low_signalled: false,
                    no_space_signalled: false,
                }, "DiffStorage::space"),
            }),
            GFP_KERNEL,
        )
    }

    /// The block device the storage is on, if it is on one.
    pub(crate) fn home(&self) -> Option<&BlockDevice> {
        self.home.as_deref()
    }

    /// True if the storage lives on `bdev` or shares sectors with it.
    pub(crate) fn is_on(&self, bdev: &BlockDevice) -> bool {
        let overlaps = |a: &BlockDevice| {
            a.dev() == bdev.dev() || a.whole().dev() == bdev.dev() || bdev.whole().dev() == a.dev()
        };
        if self.home().is_some_and(overlaps) {
            return true;
        }
        self.space.lock().ranges.iter().any(|r| match &r.target {
            Target::Device { dev, .. } => overlaps(dev.bdev()),
            _ => false,
        })
    }

    /// Appends `count` sectors from `start` of the block device at `path`.
    pub(crate) fn append(&self, path: &CStr, ranges: &[(u64, u64)]) -> Result {
        if !matches!(self.kind, Kind::Devices) {
            pr_err!("only a storage of device ranges can grow by appending\n");
            return Err(EINVAL);
        }
        // A device given before is open already, exclusively: reuse it.
        let probe = File::open(path, O_LARGEFILE, 0)?;
        let devt = probe.bdev().ok_or(ENOTBLK)?.dev();
        drop(probe);
        let known = self
            .space
            .lock()
            .ranges
            .iter()
            .find_map(|r| match &r.target {
                Target::Device { dev, .. } if dev.bdev().dev() == devt => Some(dev.clone()),
                _ => None,
            });
        let dev = match known {
            Some(dev) => dev,
            None => Arc::new(Device::open(path)?, GFP_KERNEL)?,
        };
        let size = dev.bdev().nr_sectors();
        for (i, &(start, count)) in ranges.iter().enumerate() {
            let end = start.checked_add(count).ok_or(EINVAL)?;
            if count == 0 || end > size {
                pr_err!(
                    "{}: range {}+{} is empty or past the end ({} sectors)\n",
                    path,
                    start,
                    count,
                    size
                );
                return Err(EINVAL);
            }
            for &(s2, c2) in &ranges[..i] {
                if start < s2 + c2 && s2 < end {
                    pr_err!(
                        "{}: ranges {}+{} and {}+{} overlap\n",
                        path,
                        start,
                        count,
                        s2,
                        c2
                    );
                    return Err(EINVAL);
                }
            }
        }
        let mut space = self.space.lock();
        for r in space.ranges.iter() {
            if let Target::Device { dev: d, start: s } = &r.target {
                if d.bdev().dev() != dev.bdev().dev() {
                    continue;
                }
                for &(start, count) in ranges {
                    if start < s + r.len && *s < start + count {
                        pr_err!(
                            "{}: range {}+{} overlaps storage appended before\n",
                            path,
                            start,
                            count
                        );
                        return Err(EINVAL);
                    }
                }
            }
        }
        space.ranges.reserve(ranges.len(), GFP_KERNEL)?;
        space.lengths.reserve(ranges.len(), GFP_KERNEL)?;
        for &(start, count) in ranges {
            space.lengths.push(count, GFP_KERNEL)?;
            space.ranges.push(
                Range {
                    target: Target::Device {
                        dev: dev.clone(),
                        start,
                    },
                    len: count,
                },
                GFP_KERNEL,
            )?;
        }
        let free = self.free(&space);
        if free >= low_mark() {
            space.low_signalled = false;
        }
        pr_info!(
            "storage: appended {} ranges of {}, {} MiB free\n",
            ranges.len(),
            path,
            free >> 11
        );
        Ok(())
    }

    fn free(&self, space: &Space) -> u64 {
        let mut free = free_from(&space.lengths, space.cursor);
        if let Kind::File(_) = self.kind {
            // The file may still grow.
            free += space
                .limit
                .saturating_sub(space.lengths.first().copied().unwrap_or(0));
        }
        free
    }

    /// Allocates `sectors` sectors, growing a file if needed and allowed.
    pub(crate) fn alloc(&self, sectors: u64) -> core::result::Result<u64, NoRoom> {
        let mut space = self.space.lock();
        loop {
            if let Some((range, at, next)) = place(&space.lengths, space.cursor, sectors) {
                space.cursor = next;
                space.used += sectors;
                let base: u64 = space.lengths[..range].iter().sum();
                let free = self.free(&space);
                if free < low_mark() {
                    self.low_free_space(&mut space, free);
                }
                return Ok(base + at);
            }
            // A file grows; other kinds are full.
            let Kind::File(file) = &self.kind else {
                return Err(self.full(&mut space, sectors));
            };
            let have = space.ranges[0].len;
            let step = u64::from(params::diff_storage_minimum.get()).max(sectors);
            let to = (have + step).min(space.limit);
            if to < space.used + sectors {
                return Err(self.full(&mut space, sectors));
            }
            file.allocate(have << 9, (to - have) << 9).map_err(|e| {
                pr_err!(
                    "difference storage: growing to {} sectors failed: {:?}\n",
                    to,
                    e
                );
                NoRoom::Error(e)
            })?;
            pr_info!("difference storage grew to {} MiB\n", to >> 11);
            space.ranges[0].len = to;
            space.lengths[0] = to;
        }
    }

    /// The free space dropped below half of `diff_storage_minimum`: our
    /// `low_free_space` event, once until an append re-arms it (the event
    /// queue keeps it from upstream clients). A file that cannot grow any
    /// more raises upstream's `no_space` then, as upstream does.
    fn low_free_space(&self, space: &mut Space, free: u64) {
        if !space.low_signalled {
            space.low_signalled = true;
            pr_warn!("storage: only {} sectors free\n", free);
            self.events
                .push(uapi::event::LOW_FREE_SPACE, &free.to_ne_bytes());
        }
        if matches!(self.kind, Kind::File(_)) && space.lengths[0] >= space.limit {
            self.no_space(space);
        }
    }

    /// Signals `no_space`, at most once per snapshot. Its payload is, as
    /// upstream's, the total size of the storage in sectors.
    fn no_space(&self, space: &mut Space) {
        if space.no_space_signalled {
            return;
        }
        space.no_space_signalled = true;
        let total: u64 = space.lengths.iter().sum();
        self.events
            .push(uapi::event::NO_SPACE, &total.to_ne_bytes());
    }

    /// The storage has no room for `sectors` more. A file or one of our
    /// extension stores (memory, device ranges) signals `no_space` if it
    /// did not yet; a block device given to `IOCTL_BLKSNAP_SNAPSHOT_CREATE`
    /// does not, as upstream.
    fn full(&self, space: &mut Space, sectors: u64) -> NoRoom {
        pr_err!("difference storage is full: {} sectors needed\n", sectors);
        if matches!(self.kind, Kind::File(_)) || self.events.extensions() {
            self.no_space(space);
        }
        NoRoom::Full
    }

    /// Finds the range that holds `addr`: its target and the offset in it.
    fn locate(&self, addr: u64) -> Result<(Target2, u64)> {
        let space = self.space.lock();
        let mut base = 0;
        for r in space.ranges.iter() {
            if addr < base + r.len {
                let t = match &r.target {
                    Target::File => Target2::File,
                    Target::Memory => Target2::Memory,
                    Target::Device { dev, start } => Target2::Device(dev.clone(), *start),
                };
                return Ok((t, addr - base));
            }
            base += r.len;
        }
        Err(EIO)
    }

    /// Writes `len` bytes of `pages` at address `addr`.
    pub(crate) fn write(&self, addr: u64, pages: KVec<Page>, len: usize) -> Result {
        match self.locate(addr)? {
            (Target2::File, at) => {
                let Kind::File(f) = &self.kind else {
                    return Err(EIO);
                };
                f.write_pages_at(at << 9, &pages, len)
            }
            (Target2::Device(dev, start), at) => {
                io::write_pages(dev.bdev(), start + at, pages, len, false).map(|_| ())
            }
            (Target2::Memory, at) => {
                if at % 8 != 0 || len % PAGE_SIZE != 0 {
                    return Err(EINVAL);
                }
                let mut space = self.space.lock();
                // The pages themselves are kept.
                for (i, page) in pages.into_iter().take(len / PAGE_SIZE).enumerate() {
                    let node = kernel::rbtree::RBTreeNode::new(at / 8 + i as u64, page, GFP_NOIO)?;
                    space.mem.insert(node);
                }
                Ok(())
            }
        }
    }

    /// Reads `len` bytes at address `addr` into new pages.
    pub(crate) fn read(&self, addr: u64, len: usize) -> Result<KVec<Page>> {
        match self.locate(addr)? {
            (Target2::File, at) => {
                let Kind::File(f) = &self.kind else {
                    return Err(EIO);
                };
                let mut pages = io::alloc_pages(len)?;
                f.read_pages_at(at << 9, &mut pages, len)?;
                Ok(pages)
            }
            (Target2::Device(dev, start), at) => io::read_pages(dev.bdev(), start + at, len, false),
            (Target2::Memory, at) => {
                let pages = io::alloc_pages(len)?;
                let space = self.space.lock();
                let map = &space.mem;
                let mut buf = KVec::from_elem(0u8, PAGE_SIZE, GFP_NOIO)?;
                // Byte position in the stored pages, and in the result.
                let mut pos = (at * 512) as usize;
                let mut done = 0;
                while done < len {
                    let page_off = pos % PAGE_SIZE;
                    let n = (PAGE_SIZE - page_off)
                        .min(len - done)
                        .min(PAGE_SIZE - done % PAGE_SIZE);
                    let src = map.get(&((pos / PAGE_SIZE) as u64)).ok_or(EIO)?;
                    // SAFETY: `buf` holds `n` bytes; both pages hold a full page.
                    unsafe {
                        src.read_raw(buf.as_mut_ptr(), page_off, n)?;
                        pages[done / PAGE_SIZE].write_raw(buf.as_ptr(), done % PAGE_SIZE, n)?;
                    }
                    pos += n;
                    done += n;
                }
                Ok(pages)
            }
        }
    }

    /// Sectors used and sectors that exist now.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let s = self.space.lock();
        (s.used, s.ranges.iter().map(|r| r.len).sum())
    }
}

/// A located range target, cloned out of the lock.
enum Target2 {
    File,
    Memory,
    Device(Arc<Device>, u64),
}

/// Free space below which `low_free_space` is signalled.
fn low_mark() -> u64 {
    u64::from(params::diff_storage_minimum.get()) / 2
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
