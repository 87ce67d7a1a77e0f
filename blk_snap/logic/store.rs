// SPDX-License-Identifier: GPL-2.0

//! Space accounting of a difference storage, shared by the kernel module and
//! the host tests.
//!
//! Chunks are stored one after another. A storage has `available` sectors
//! now and may grow, in steps, up to `limit` sectors (a file that is extended
//! with fallocate; a block device cannot grow).
//!
//! A storage reads and writes whole blocks of at least 4 KiB (direct I/O on
//! a file, bios on a device with 4 KiB logical sectors, pages in memory).
//! Allocations are placed on such blocks and rounded up to whole blocks, so
//! that a short last chunk of a device (one whose size is not a multiple of
//! 4 KiB) takes a whole block and leaves the next allocation aligned; reads
//! and writes of parts of blocks are padded to whole blocks by the storage.

use core::ops::Range;

/// Why an allocation failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Alloc {
    /// The storage must first grow to this many sectors.
    Grow(u64),
    /// The storage is full and cannot grow enough.
    Full,
}

/// The space of a difference storage, in sectors.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoreSpace {
    /// Sectors handed out.
    pub used: u64,
    /// Sectors that exist now.
    pub available: u64,
    /// Largest size the storage may grow to.
    pub limit: u64,
    /// Growth step.
    pub step: u64,
}

impl StoreSpace {
    /// A storage of `available` sectors that may grow by `step` up to `limit`.
    pub fn new(available: u64, limit: u64, step: u64) -> Self {
        Self {
            used: 0,
            available: available.min(limit),
            limit,
            step,
        }
    }

    /// Allocates `sectors` and returns their offset, or tells how to grow.
    pub fn alloc(&mut self, sectors: u64) -> Result<u64, Alloc> {
        let end = self.used.checked_add(sectors).ok_or(Alloc::Full)?;
        if end <= self.available {
            let offset = self.used;
            self.used = end;
            return Ok(offset);
        }
        if end > self.limit {
            return Err(Alloc::Full);
        }
        // Grow in whole steps, but never past the limit.
        let needed = end - self.available;
        let steps = needed.div_ceil(self.step.max(1));
        let target = self
            .available
            .saturating_add(steps.saturating_mul(self.step.max(1)))
            .min(self.limit);
        Err(Alloc::Grow(target))
    }

    /// Records that the storage grew to `available` sectors.
    pub fn grown(&mut self, available: u64) {
        self.available = available.min(self.limit).max(self.available);
    }

    /// Sectors that can still be allocated without growing.
    pub fn free_now(&self) -> u64 {
        self.available - self.used
    }
}

/// Sectors of the smallest block a difference storage reads or writes:
/// 4 KiB, the page size and the largest logical block size of common
/// devices. Allocations start on such blocks and take whole blocks, so that
/// a short last chunk of a device never leaves the storage misaligned.
pub const STORE_BLOCK_SECTORS: u64 = 8;

/// The block size, in sectors, of a storage on a device (or on a file
/// system on a device) whose logical block size is `logical_block_size`
/// bytes: [`STORE_BLOCK_SECTORS`], or the logical block size if larger.
pub fn store_alignment(logical_block_size: u32) -> u64 {
    (u64::from(logical_block_size) >> 9)
        .max(STORE_BLOCK_SECTORS)
        .next_power_of_two()
}

/// `x` rounded up to a multiple of `align`, `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    let align = align.max(1);
    x.checked_next_multiple_of(align)
}

/// `x` rounded down to a multiple of `align`.
pub fn align_down(x: u64, align: u64) -> u64 {
    let align = align.max(1);
    x - x % align
}

/// The whole blocks of `align` sectors that hold the `sectors` sectors from
/// `at`: what a storage that transfers only whole blocks reads or writes to
/// serve them. `None` for an empty or overflowing request.
pub fn io_window(at: u64, sectors: u64, align: u64) -> Option<Range<u64>> {
    if sectors == 0 {
        return None;
    }
    let end = align_up(at.checked_add(sectors)?, align)?;
    Some(align_down(at, align)..end)
}

/// A part of a storage: `len` sectors in which allocations start on
/// multiples of `align` sectors and take whole multiples of `align`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Extent {
    /// Length in sectors.
    pub len: u64,
    /// Block size in sectors.
    pub align: u64,
}

impl Extent {
    /// An extent of the whole blocks of `align` sectors in `len` sectors:
    /// a partial block at the end is not used.
    pub fn new(len: u64, align: u64) -> Self {
        Self {
            len: align_down(len, align),
            align: align.max(1),
        }
    }

    /// Sectors that can still be allocated from `used` on.
    fn rest(&self, used: u64) -> u64 {
        match align_up(used, self.align) {
            Some(at) => align_down(self.len, self.align).saturating_sub(at),
            None => 0,
        }
    }
}

/// The next free place in a storage made of several extents.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Cursor {
    /// Index of the extent.
    pub extent: usize,
    /// Sectors used in it.
    pub used: u64,
}

/// Where [`place`] put an allocation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Placement {
    /// Index of the extent.
    pub extent: usize,
    /// Offset in the extent, a multiple of its block size.
    pub at: u64,
    /// Sectors taken: the request rounded up to whole blocks.
    pub sectors: u64,
    /// The cursor after the allocation.
    pub next: Cursor,
}

/// Places `sectors` in `extents` from `cursor` on. An allocation starts on
/// a block of its extent and takes whole blocks; it never straddles two
/// extents: when the rest of an extent is too small, it stays unused and
/// the next extent is tried.
pub fn place(extents: &[Extent], cursor: Cursor, sectors: u64) -> Option<Placement> {
    let mut c = cursor;
    while let Some(e) = extents.get(c.extent) {
        let fits = align_up(c.used, e.align).and_then(|at| {
            let size = align_up(sectors, e.align)?;
            (at.checked_add(size)? <= align_down(e.len, e.align)).then_some((at, size))
        });
        if let Some((at, size)) = fits {
            return Some(Placement {
                extent: c.extent,
                at,
                sectors: size,
                next: Cursor {
                    extent: c.extent,
                    used: at + size,
                },
            });
        }
        c = Cursor {
            extent: c.extent + 1,
            used: 0,
        };
    }
    None
}

/// Sectors still free from `cursor` on, counting the rests of extents.
pub fn free_from(extents: &[Extent], cursor: Cursor) -> u64 {
    extents
        .iter()
        .enumerate()
        .skip(cursor.extent)
        .map(|(i, e)| e.rest(if i == cursor.extent { cursor.used } else { 0 }))
        .sum()
}

/// Why a range of a device cannot be used as storage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RangeError {
    /// The range has no sectors.
    Empty,
    /// The range ends past the end of the device, or overflows.
    PastEnd,
    /// The start or the length is not a multiple of the device's logical
    /// block size.
    Misaligned,
    /// The range holds no whole block of the storage's block size.
    TooSmall,
}

/// Checks the range of `count` sectors from `start` of a device of
/// `capacity` sectors whose logical block size is `logical_block_size`
/// bytes, and returns the sectors the storage uses: the whole blocks of
/// [`store_alignment`] in it, aligned on the device. A range whose start
/// or length is not a multiple of the logical block size is refused.
pub fn usable_range(
    start: u64,
    count: u64,
    capacity: u64,
    logical_block_size: u32,
) -> Result<Range<u64>, RangeError> {
    if count == 0 {
        return Err(RangeError::Empty);
    }
    let end = start.checked_add(count).ok_or(RangeError::PastEnd)?;
    if end > capacity {
        return Err(RangeError::PastEnd);
    }
    let lbs = (u64::from(logical_block_size) >> 9).max(1);
    if align_down(start, lbs) != start || align_down(count, lbs) != count {
        return Err(RangeError::Misaligned);
    }
    let align = store_alignment(logical_block_size);
    let first = align_up(start, align).ok_or(RangeError::TooSmall)?;
    let last = align_down(end, align);
    if last <= first {
        return Err(RangeError::TooSmall);
    }
    Ok(first..last)
}

/// Finds a cycle in the graph of "the storage of snapshot `i` is on a
/// device of snapshot `j`" (`edge(i, j)`) over `n` snapshots, and returns a
/// snapshot on it.
///
/// Copies of a snapshot write to its storage; if that is on a device of
/// another snapshot, the write waits there for the other snapshot's copy.
/// Along a path of such waits every copy ends, as long as the path ends at a
/// device of no snapshot; around a cycle, each copy triggers another one for
/// ever (every storage write lands on a chunk never written before), or the
/// copies wait for one another.
///
/// `color` and `stack` are scratch space of at least `n` elements each (no
/// allocation here); the search is iterative and takes O(n^2) calls of
/// `edge`.
pub fn storage_cycle(
    n: usize,
    edge: impl Fn(usize, usize) -> bool,
    color: &mut [u8],
    stack: &mut [(usize, usize)],
) -> Option<usize> {
    const WHITE: u8 = 0;
    const GREY: u8 = 1;
    const BLACK: u8 = 2;
    let color = &mut color[..n];
    color.fill(WHITE);
    for root in 0..n {
        if color[root] != WHITE {
            continue;
        }
        // Depth-first: each stack entry is a snapshot and the next one to
        // look at from it.
        let mut depth = 0;
        stack[depth] = (root, 0);
        color[root] = GREY;
        depth += 1;
        while depth > 0 {
            let (v, next) = stack[depth - 1];
            if next == n {
                color[v] = BLACK;
                depth -= 1;
                continue;
            }
            stack[depth - 1].1 = next + 1;
            if !edge(v, next) {
                continue;
            }
            match color[next] {
                GREY => return Some(next),
                WHITE => {
                    color[next] = GREY;
                    stack[depth] = (next, 0);
                    depth += 1;
                }
                _ => {}
            }
        }
    }
    None
}

/// The order in which a take holds the writes of the `n` devices of a
/// snapshot, given `stacked(i, j)`: device `i` is stacked, directly or
/// through other devices, on device `j` (device-mapper, md; a relation that
/// is transitive and has no cycle). Writes `level[i]` into `levels`: the
/// number of the snapshot's devices stacked on device `i`.
///
/// A write to a stacked device goes on, after its filter let it pass, as
/// writes to the devices under it, sometimes much later (dm-crypt encrypts
/// in a worker, md RAID1 may write from its thread). A take that held every
/// device at once and then waited for the writes in flight would wait for
/// a write to the upper device whose lower half it holds: for ever. Held
/// level by level, from 0 up, and each level drained before the next is
/// held, every write in flight on a device finds the devices under it still
/// open. A device above another always has the lower level: whatever is
/// stacked on it is stacked on the lower one too, and it is itself.
pub fn stack_levels(n: usize, stacked: impl Fn(usize, usize) -> bool, levels: &mut [usize]) {
    for (i, level) in levels[..n].iter_mut().enumerate() {
        *level = (0..n).filter(|&j| j != i && stacked(j, i)).count();
    }
}

/// The largest limit, in sectors, of a storage in memory on a machine with
/// `ram_sectors` of RAM: half of it. The pages are taken from the kernel as
/// chunks are stored, without swap; a limit above this would let a
/// snapshot take the memory that the machine needs to run.
pub fn memory_limit_max(ram_sectors: u64) -> u64 {
    ram_sectors / 2
}

/// The `MemTotal` of /proc/meminfo text, in KiB.
pub fn mem_total_kib(text: &[u8]) -> Option<u64> {
    let key = b"MemTotal:";
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[start..];
    let rest = &rest[rest.iter().position(|b| *b != b' ')?..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || !rest[digits..].starts_with(b" kB") {
        return None;
    }
    let mut v: u64 = 0;
    for &d in &rest[..digits] {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(v)
}
