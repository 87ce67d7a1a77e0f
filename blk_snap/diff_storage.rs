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
//! The storage works in blocks of 4 KiB, or of the logical block size of
//! the device it is on if that is larger ([`store_alignment`]): every range
//! starts on such a block of its device and holds whole blocks, every
//! allocation starts on a block and takes whole blocks (a chunk of 512 bytes
//! at the end of an odd-sized device takes 4 KiB). [`DiffStorage::read`] and
//! [`DiffStorage::write`] take any sectors inside an allocation, and pad
//! them to whole blocks: a partial block is read, or read, modified and
//! written back.
//!
//! Addresses handed out are sectors of a virtual space in which the ranges
//! follow one another.

use crate::{
    event_queue::EventQueue,
    io, params,
    store::{
        align_down, align_up, free_from, io_window, mem_total_kib, memory_limit_max, place,
        store_alignment, usable_range, Cursor, Extent, RangeError,
    },
    uapi,
};
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::{
    alloc::{
        flags::{__GFP_ZERO, GFP_KERNEL, GFP_NOIO},
        KBox, KVec,
    },
    block::bdev::BlockDevice,
    error::code::*,
    fs::file::{flags::*, File},
    new_condvar, new_mutex,
    page::{Page, PAGE_SIZE},
    prelude::*,
    rbtree::{RBTree, RBTreeNode},
    str::CStr,
    sync::{Arc, CondVar, Mutex},
    task::NoIoScope,
};

/// A block device opened exclusively for the storage.
pub(crate) struct Device {
    file: File,
    // The exclusive holder: a unique address owned by the storage.
    _holder: KBox<u8>,
}

impl Device {
    /// Opens the block device at `path` exclusively.
    pub(crate) fn open(path: &CStr) -> Result<Self> {
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

    /// The block device.
    pub(crate) fn bdev(&self) -> &BlockDevice {
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
    /// A block device, from sector `start`, a multiple of the block size.
    Device { dev: Arc<Device>, start: u64 },
}

/// A range of the storage. Its length and block size are in the
/// [`Extent`] of the same index in `Space::extents`.
struct Range {
    target: Target,
}

/// The storage kind.
enum Kind {
    /// A file; it is in [`Space::file`] until the storage is released.
    File,
    Memory,
    Devices,
}

struct Space {
    ranges: KVec<Range>,
    /// The lengths and block sizes of `ranges`, for [`place`].
    extents: KVec<Extent>,
    /// For memory: the pages, by page index of the address.
    mem: RBTree<u64, Page>,
    cursor: Cursor,
    used: u64,
    /// For a file: the size it may grow to, in whole blocks.
    limit: u64,
    /// `low_free_space` was signalled and not re-armed by an append.
    low_signalled: bool,
    /// `no_space` was signalled: it comes at most once per snapshot.
    no_space_signalled: bool,
    /// A file is being grown, without the lock: other allocations that
    /// need it to grow wait for [`DiffStorage::grown`].
    growing: bool,
    /// For a file: the file. I/O takes a reference under the lock and does
    /// its work without; [`DiffStorage::release`] takes it out, and the
    /// file closes when the last I/O in flight lets go of it.
    file: Option<Arc<File>>,
    /// [`DiffStorage::release`] was called: no I/O, no allocation.
    released: bool,
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
    /// Signalled when a file stopped growing.
    #[pin]
    grown: CondVar,
    /// `Space::growing`, for [`DiffStorage::growing`] without the lock.
    grow_busy: AtomicBool,
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
            let (sectors, lbs) = (dev.bdev().nr_sectors(), dev.bdev().logical_block_size());
            let usable = usable_range(0, sectors, sectors, lbs).map_err(|_| {
                pr_err!(
                    "difference storage {}: {} sectors hold no block of {} sectors\n",
                    path,
                    sectors,
                    store_alignment(lbs)
                );
                EINVAL
            })?;
            let home = Some(kernel::types::ARef::from(dev.bdev()));
            let extent = Extent::new(usable.end, store_alignment(lbs));
            let range = Range {
                target: Target::Device { dev, start: 0 },
            };
            return Self::new(
                Kind::Devices,
                events,
                home,
                one(range)?,
                one(extent)?,
                extent.len,
            );
        }
        let home = probe.fs_bdev().map(kernel::types::ARef::from);
        // Direct I/O on a file system on a device is aligned to the device's
        // logical block size.
        let align = store_alignment(probe.fs_bdev().map_or(0, |b| b.logical_block_size()));
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
        let limit = align_down(limit.max(sectors), align);
        if limit == 0 {
            pr_err!(
                "difference storage {}: no space and a limit below {} sectors\n",
                path,
                align
            );
            return Err(EINVAL);
        }
        let range = Range {
            target: Target::File,
        };
        let extent = Extent::new(sectors, align);
        let s = Self::new(Kind::File, events, home, one(range)?, one(extent)?, limit)?;
        s.space.lock().file = Some(Arc::new(file, GFP_KERNEL)?);
        Ok(s)
    }

    /// A storage in memory of up to `limit` sectors, at most half of the
    /// RAM ([`memory_limit_max`]): the pages are taken as chunks are stored,
    /// and cannot be swapped.
    pub(crate) fn memory(limit: u64, events: Arc<EventQueue>) -> Result<Arc<Self>> {
        let ram = total_ram_sectors()?;
        if limit > memory_limit_max(ram) {
            pr_err!(
                "a memory storage of {} MiB is more than half of the RAM ({} MiB)\n",
                limit >> 11,
                ram >> 11
            );
            return Err(EINVAL);
        }
        let range = Range {
            target: Target::Memory,
        };
        // Whole pages.
        let extent = Extent::new(limit, store_alignment(PAGE_SIZE as u32));
        Self::new(
            Kind::Memory,
            events,
            None,
            one(range)?,
            one(extent)?,
            extent.len,
        )
    }

    /// A storage of block device ranges, empty until ranges are appended.
    pub(crate) fn devices(events: Arc<EventQueue>) -> Result<Arc<Self>> {
        Self::new(Kind::Devices, events, None, KVec::new(), KVec::new(), 0)
    }

    fn new(
        kind: Kind,
        events: Arc<EventQueue>,
        home: Option<kernel::types::ARef<BlockDevice>>,
        ranges: KVec<Range>,
        extents: KVec<Extent>,
        limit: u64,
    ) -> Result<Arc<Self>> {
        Arc::pin_init(
            try_pin_init!(Self {
                kind,
                events,
                home,
                space <- new_mutex!(Space {
                    ranges,
                    extents,
                    mem: RBTree::new(),
                    cursor: Cursor::default(),
                    used: 0,
                    limit,
                    low_signalled: false,
                    no_space_signalled: false,
                    growing: false,
                    file: None,
                    released: false,
                }, "DiffStorage::space"),
                grown <- new_condvar!("DiffStorage::grown"),
                grow_busy: AtomicBool::new(false),
            }),
            GFP_KERNEL,
        )
    }

    /// The block device the storage is on, if it is on one.
    pub(crate) fn home(&self) -> Option<&BlockDevice> {
        self.home.as_deref()
    }

    /// True if the storage lives on `bdev`, shares sectors with it, or is on
    /// a device stacked over it.
    pub(crate) fn is_on(&self, bdev: &BlockDevice) -> bool {
        // Sharing sectors, or stacked over it (device-mapper, md).
        let overlaps = |a: &BlockDevice| {
            a.dev() == bdev.dev()
                || a.whole().dev() == bdev.dev()
                || bdev.whole().dev() == a.dev()
                || a.is_stacked_on(bdev)
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
    ///
    /// A range must be whole logical blocks of the device; of it, the whole
    /// blocks of the storage's block size are used (on a device with
    /// 512-byte sectors, up to 7 sectors at either end of a range that is
    /// not on 4 KiB boundaries stay unused).
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
        let (size, lbs) = (dev.bdev().nr_sectors(), dev.bdev().logical_block_size());
        let align = store_alignment(lbs);
        // The sectors used of each range.
        let mut usable = KVec::with_capacity(ranges.len(), GFP_KERNEL)?;
        for (i, &(start, count)) in ranges.iter().enumerate() {
            let r = usable_range(start, count, size, lbs).map_err(|e| {
                match e {
                    RangeError::Empty | RangeError::PastEnd => pr_err!(
                        "{}: range {}+{} is empty or past the end ({} sectors)\n",
                        path,
                        start,
                        count,
                        size
                    ),
                    RangeError::Misaligned => pr_err!(
                        "{}: range {}+{} is not on logical blocks of {} bytes\n",
                        path,
                        start,
                        count,
                        lbs
                    ),
                    RangeError::TooSmall => pr_err!(
                        "{}: range {}+{} holds no aligned block of {} sectors\n",
                        path,
                        start,
                        count,
                        align
                    ),
                }
                EINVAL
            })?;
            for &(s2, c2) in &ranges[..i] {
                if start < s2 + c2 && s2 < start + count {
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
            usable.push(r, GFP_KERNEL)?;
        }
        let mut space = self.space.lock();
        let space = &mut *space;
        for (r, e) in space.ranges.iter().zip(space.extents.iter()) {
            if let Target::Device { dev: d, start: s } = &r.target {
                if d.bdev().dev() != dev.bdev().dev() {
                    continue;
                }
                for &(start, count) in ranges {
                    if start < s + e.len && *s < start + count {
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
        space.extents.reserve(ranges.len(), GFP_KERNEL)?;
        for r in usable.iter() {
            space
                .extents
                .push(Extent::new(r.end - r.start, align), GFP_KERNEL)?;
            space.ranges.push(
                Range {
                    target: Target::Device {
                        dev: dev.clone(),
                        start: r.start,
                    },
                },
                GFP_KERNEL,
            )?;
        }
        // Each append re-arms the event, as the UAPI says: an agent that
        // appended too little hears again at the next allocation below the
        // mark, instead of waiting for an event that never comes while the
        // storage overflows.
        let free = self.free(space);
        space.low_signalled = false;
        pr_info!(
            "storage: appended {} ranges of {}, {} MiB free\n",
            ranges.len(),
            path,
            free >> 11
        );
        Ok(())
    }

    fn free(&self, space: &Space) -> u64 {
        let mut free = free_from(&space.extents, space.cursor);
        if let Kind::File = self.kind {
            // The file may still grow.
            free += space
                .limit
                .saturating_sub(space.extents.first().map_or(0, |e| e.len));
        }
        free
    }

    /// Allocates `sectors` sectors, growing a file if needed and allowed.
    /// The allocation starts on a block of the storage and takes whole
    /// blocks.
    pub(crate) fn alloc(&self, sectors: u64) -> core::result::Result<u64, NoRoom> {
        let mut space = self.space.lock();
        loop {
            if space.released {
                return Err(NoRoom::Error(EIO));
            }
            if let Some(p) = place(&space.extents, space.cursor, sectors) {
                space.cursor = p.next;
                space.used += p.sectors;
                let base: u64 = space.extents[..p.extent].iter().map(|e| e.len).sum();
                let free = self.free(&space);
                if free < low_mark() {
                    self.low_free_space(&mut space, free);
                }
                return Ok(base + p.at);
            }
            // A file grows; other kinds are full.
            let Some(file) = space.file.clone() else {
                return Err(self.full(&mut space, sectors));
            };
            if space.growing {
                self.grown.wait(&mut space);
                continue;
            }
            let align = space.extents[0].align;
            let Some(need) = align_up(sectors, align) else {
                return Err(self.full(&mut space, sectors));
            };
            let have = file.size() >> 9;
            let step = u64::from(params::diff_storage_minimum.get()).max(need);
            let to = have.saturating_add(step).min(space.limit);
            if align_down(to, align) < space.used + need {
                return Err(self.full(&mut space, sectors));
            }
            if to > have {
                // Without the lock: reads of the storage and allocations
                // that fit go on meanwhile.
                space.growing = true;
                self.grow_busy.store(true, Ordering::Relaxed);
                drop(space);
                let grown = {
                    // Called by copies, which reclaim may wait for.
                    let _noio = NoIoScope::new();
                    file.allocate(have << 9, (to - have) << 9)
                };
                space = self.space.lock();
                space.growing = false;
                self.grow_busy.store(false, Ordering::Relaxed);
                self.grown.notify_all();
                grown.map_err(|e| {
                    pr_err!(
                        "difference storage: growing to {} sectors failed: {:?}\n",
                        to,
                        e
                    );
                    NoRoom::Error(e)
                })?;
                pr_info!("difference storage grew to {} MiB\n", to >> 11);
            }
            if space.released {
                // Released while it grew.
                return Err(NoRoom::Error(EIO));
            }
            space.extents[0] = Extent::new(to, align);
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
        if matches!(self.kind, Kind::File)
            && space.extents[0].len >= align_down(space.limit, space.extents[0].align)
        {
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
        let total: u64 = space.extents.iter().map(|e| e.len).sum();
        self.events
            .push(uapi::event::NO_SPACE, &total.to_ne_bytes());
    }

    /// The storage has no room for `sectors` more. A file or one of our
    /// extension stores (memory, device ranges) signals `no_space` if it
    /// did not yet; a block device given to `IOCTL_BLKSNAP_SNAPSHOT_CREATE`
    /// does not, as upstream.
    fn full(&self, space: &mut Space, sectors: u64) -> NoRoom {
        pr_err!("difference storage is full: {} sectors needed\n", sectors);
        if matches!(self.kind, Kind::File) || self.events.extensions() {
            self.no_space(space);
        }
        NoRoom::Full
    }

    /// Finds the range that holds the `sectors` sectors from `addr`.
    fn locate(&self, addr: u64, sectors: u64) -> Result<Located> {
        let space = self.space.lock();
        if space.released {
            return Err(EIO);
        }
        let mut base = 0;
        for (r, e) in space.ranges.iter().zip(space.extents.iter()) {
            if addr < base + e.len {
                let at = addr - base;
                if sectors > e.len - at {
                    // Allocations never straddle two ranges.
                    return Err(EIO);
                }
                let target = match &r.target {
                    Target::File => Target2::File(space.file.clone().ok_or(EIO)?),
                    Target::Memory => Target2::Memory,
                    Target::Device { dev, start } => Target2::Device(dev.clone(), *start),
                };
                return Ok(Located {
                    target,
                    at,
                    align: e.align,
                });
            }
            base += e.len;
        }
        Err(EIO)
    }

    /// The device and its sector that hold the `sectors` sectors at `addr`,
    /// if a device of the storage holds them as whole blocks of its own:
    /// then they can be read with a bio of the caller's, not through pages
    /// of the storage's. `None` for memory and files, or if that is not so.
    pub(crate) fn device_at(&self, addr: u64, sectors: u64) -> Option<(Arc<Device>, u64)> {
        let loc = self.locate(addr, sectors).ok()?;
        let Target2::Device(dev, start) = loc.target else {
            return None;
        };
        if io_window(loc.at, sectors, loc.align)? != (loc.at..loc.at + sectors) {
            return None;
        }
        Some((dev, start + loc.at))
    }

    /// Writes `len` bytes of `pages` at address `addr`: any whole sectors
    /// inside an allocation.
    pub(crate) fn write(&self, addr: u64, pages: KVec<Page>, len: usize) -> Result {
        // Copies and image I/O call this, and reclaim may wait for them: the
        // file system's allocations for this I/O must start no I/O.
        let _noio = NoIoScope::new();
        let sectors = io_sectors(len, pages.len())?;
        let loc = self.locate(addr, sectors)?;
        if let Target2::Memory = loc.target {
            return self.write_memory(loc.at, pages, len);
        }
        let window = io_window(loc.at, sectors, loc.align).ok_or(EINVAL)?;
        if window == (loc.at..loc.at + sectors) {
            return self.write_blocks(&loc.target, loc.at, pages, len);
        }
        // Part of a block: read, modify and write back the whole blocks.
        // The blocks belong to this allocation alone.
        let wlen = ((window.end - window.start) << 9) as usize;
        let mut blocks = self.read_blocks(&loc.target, window.start, wlen)?;
        let offset = ((loc.at - window.start) << 9) as usize;
        io::copy_pages(&pages, 0, &mut blocks, offset, len)?;
        self.write_blocks(&loc.target, window.start, blocks, wlen)
    }

    /// Reads `len` bytes at address `addr` into new pages: any whole sectors
    /// inside an allocation.
    pub(crate) fn read(&self, addr: u64, len: usize) -> Result<KVec<Page>> {
        // As for writes.
        let _noio = NoIoScope::new();
        let sectors = io_sectors(len, len.div_ceil(PAGE_SIZE))?;
        let loc = self.locate(addr, sectors)?;
        if let Target2::Memory = loc.target {
            return self.read_memory(loc.at, len);
        }
        let window = io_window(loc.at, sectors, loc.align).ok_or(EINVAL)?;
        if window == (loc.at..loc.at + sectors) {
            return self.read_blocks(&loc.target, loc.at, len);
        }
        // Part of a block: read the whole blocks.
        let wlen = ((window.end - window.start) << 9) as usize;
        let blocks = self.read_blocks(&loc.target, window.start, wlen)?;
        let mut pages = io::alloc_pages(len)?;
        let offset = ((loc.at - window.start) << 9) as usize;
        io::copy_pages(&blocks, offset, &mut pages, 0, len)?;
        Ok(pages)
    }

    /// Writes whole blocks to a file or a device.
    fn write_blocks(&self, target: &Target2, at: u64, pages: KVec<Page>, len: usize) -> Result {
        match target {
            Target2::File(f) => f.write_pages_at(at << 9, &pages, len),
            Target2::Device(dev, start) => {
                io::write_pages(dev.bdev(), start + at, pages, len, false).map(|_| ())
            }
            Target2::Memory => Err(EIO),
        }
    }

    /// Reads whole blocks of a file or a device into new pages.
    fn read_blocks(&self, target: &Target2, at: u64, len: usize) -> Result<KVec<Page>> {
        match target {
            Target2::File(f) => {
                let mut pages = io::alloc_pages(len)?;
                f.read_pages_at(at << 9, &mut pages, len)?;
                Ok(pages)
            }
            Target2::Device(dev, start) => io::read_pages(dev.bdev(), start + at, len, false),
            Target2::Memory => Err(EIO),
        }
    }

    /// Stores `len` bytes of `pages` in memory from sector `at`. Whole
    /// pages are kept as they are; parts of pages are copied into the
    /// stored pages, which start zeroed.
    fn write_memory(&self, at: u64, pages: KVec<Page>, len: usize) -> Result {
        let mut space = self.space.lock();
        let mem = &mut space.mem;
        let pos = at << 9;
        if pos % PAGE_SIZE as u64 == 0 {
            let first = pos / PAGE_SIZE as u64;
            for (i, page) in pages.into_iter().enumerate() {
                let done = i * PAGE_SIZE;
                if done >= len {
                    break;
                }
                let key = first + i as u64;
                let n = (len - done).min(PAGE_SIZE);
                if n == PAGE_SIZE {
                    mem.insert(RBTreeNode::new(key, page, GFP_NOIO)?);
                } else {
                    let dst = mem_page(mem, key)?;
                    dst.copy_from(0, &page, 0, n)?;
                }
            }
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            let p = pos + done as u64;
            let offset = (p % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - offset).min(len - done);
            let dst = mem_page(mem, p / PAGE_SIZE as u64)?;
            io::copy_pages(&pages, done, core::slice::from_mut(dst), offset, n)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `len` bytes from memory from sector `at` into new pages.
    fn read_memory(&self, at: u64, len: usize) -> Result<KVec<Page>> {
        let mut pages = io::alloc_pages(len)?;
        let space = self.space.lock();
        let pos = at << 9;
        let mut done = 0;
        while done < len {
            let p = pos + done as u64;
            let offset = (p % PAGE_SIZE as u64) as usize;
            let n = (PAGE_SIZE - offset).min(len - done);
            let src = space.mem.get(&(p / PAGE_SIZE as u64)).ok_or(EIO)?;
            io::copy_pages(core::slice::from_ref(src), offset, &mut pages, done, n)?;
            done += n;
        }
        Ok(pages)
    }

    /// True while a file storage grows. Takes no lock.
    pub(crate) fn growing(&self) -> bool {
        self.grow_busy.load(Ordering::Relaxed)
    }

    /// Lets go of the backing at once, when the snapshot is destroyed:
    /// closes the file (an unnamed one frees its space then) and the block
    /// devices, frees the memory. Image readers that still hold the storage
    /// get EIO from here on; I/O in flight ends on the file or the devices
    /// it already holds, which close when it does.
    pub(crate) fn release(&self) {
        let (file, ranges, mem) = {
            let mut space = self.space.lock();
            space.released = true;
            space.extents.clear();
            (
                space.file.take(),
                core::mem::take(&mut space.ranges),
                core::mem::take(&mut space.mem),
            )
        };
        // Closed here, outside the lock: a file system may do I/O.
        drop((file, ranges, mem));
    }

    /// Sectors used and sectors that exist now.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let s = self.space.lock();
        (s.used, s.extents.iter().map(|e| e.len).sum())
    }
}

/// A range found by [`DiffStorage::locate`].
struct Located {
    target: Target2,
    /// The sector in the range.
    at: u64,
    /// The block size of the range.
    align: u64,
}

/// The stored page of memory page `key`, a new zeroed one if none is.
fn mem_page(mem: &mut RBTree<u64, Page>, key: u64) -> Result<&mut Page> {
    if mem.get(&key).is_none() {
        let page = Page::alloc_page(GFP_NOIO | __GFP_ZERO)?;
        mem.insert(RBTreeNode::new(key, page, GFP_NOIO)?);
    }
    mem.get_mut(&key).ok_or(EIO)
}

/// The sectors of an I/O of `len` bytes in `pages` pages.
fn io_sectors(len: usize, pages: usize) -> Result<u64> {
    if len == 0 || len % 512 != 0 || len > pages * PAGE_SIZE {
        return Err(EINVAL);
    }
    Ok((len >> 9) as u64)
}

/// A located range target, cloned out of the lock.
enum Target2 {
    File(Arc<File>),
    Memory,
    Device(Arc<Device>, u64),
}

/// The machine's RAM in sectors: the `MemTotal` that /proc/meminfo
/// reports, which is `totalram_pages()`. (Read from there because the
/// kernel crate has no binding of `totalram_pages()` yet.)
fn total_ram_sectors() -> Result<u64> {
    let unknown = |e| {
        pr_err!(
            "the size of the RAM is unknown (/proc/meminfo: {:?}): no memory storage\n",
            e
        );
        e
    };
    let f = File::open(kernel::c_str!("/proc/meminfo"), O_LARGEFILE, 0).map_err(unknown)?;
    // The first line is MemTotal.
    let len = 512;
    let mut pages = io::alloc_pages(len)?;
    f.read_pages_at(0, &mut pages, len).map_err(unknown)?;
    let mut text = KVec::with_capacity(len, GFP_KERNEL)?;
    io::read_pages_to(&pages, len, |_, bytes| {
        text.extend_from_slice(bytes, GFP_KERNEL)?;
        Ok(())
    })?;
    let kib = mem_total_kib(&text).ok_or(EINVAL).map_err(unknown)?;
    Ok(kib.saturating_mul(2))
}

/// A vector of one element.
fn one<T>(x: T) -> Result<KVec<T>> {
    let mut v = KVec::with_capacity(1, GFP_KERNEL)?;
    v.push(x, GFP_KERNEL)?;
    Ok(v)
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
