// SPDX-License-Identifier: GPL-2.0

//! Change block tracking (CBT) arithmetic, shared by the kernel module and the
//! host tests.
//!
//! A tracked device is cut into blocks of a power-of-two size. One byte per
//! block holds the number of the last snapshot in which the block changed.
//! Two maps exist: the *active* map records writes as they happen with the
//! active snapshot number; the *read* map is a copy of the active map taken
//! when a snapshot is taken, so user space can read a stable view while
//! tracking goes on.
//!
//! Snapshot numbers run from 1 to 255 within a *generation*, identified by a
//! random UUID. Taking the snapshot that would need number 256 starts a new
//! generation: both maps are cleared, the numbers restart, and user space,
//! seeing a new generation id, knows that its earlier numbers are void.

use core::ops::Range;

/// Shift from bytes to 512-byte sectors.
pub const SECTOR_SHIFT: u32 = 9;

/// The highest snapshot number of a generation.
pub const MAX_SNAPSHOT_NUMBER: u8 = 255;

/// Errors of the CBT arithmetic; the kernel maps them to errnos.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CbtError {
    /// The module parameters describe no valid block size.
    BadParams,
    /// The device is too large to be tracked with these parameters.
    TooLarge,
    /// A sector range is empty, overflows, or lies outside the device.
    BadRange,
    /// A map read lies outside the map.
    OutOfMap,
}

/// Module parameters that choose the tracking block size.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CbtParams {
    /// Smallest block size, as a power of two in bytes.
    pub block_minimum_shift: u32,
    /// The block size grows until the device has at most this many blocks...
    pub block_maximum_count: u32,
    /// ...or until the block size reaches this power of two.
    pub block_maximum_shift: u32,
}

impl CbtParams {
    /// The upstream defaults: 64 KiB blocks, at most 2097152 blocks, at most
    /// 64 MiB per block.
    pub const DEFAULT: Self = Self {
        block_minimum_shift: 16,
        block_maximum_count: 2_097_152,
        block_maximum_shift: 26,
    };
}

/// How a device is cut into tracking blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CbtGeometry {
    /// Device size in sectors when tracking started.
    pub capacity_sectors: u64,
    /// Block size as a power of two in bytes.
    pub block_shift: u32,
    /// Number of blocks; the last one may be partial.
    pub block_count: u32,
}

fn blocks_for(capacity_sectors: u64, block_shift: u32) -> u64 {
    let sectors_per_block_shift = block_shift - SECTOR_SHIFT;
    capacity_sectors.div_ceil(1u64 << sectors_per_block_shift)
}

impl CbtGeometry {
    /// Chooses the block size for a device of `capacity_sectors` sectors: the
    /// smallest power of two from `block_minimum_shift` for which the device
    /// has at most `block_maximum_count` blocks, but not above
    /// `block_maximum_shift` (then the count may exceed the maximum).
    pub fn new(capacity_sectors: u64, params: &CbtParams) -> Result<Self, CbtError> {
        let CbtParams {
            block_minimum_shift: min,
            block_maximum_count: max_count,
            block_maximum_shift: max,
        } = *params;
        // Blocks are at least a sector, and their size must fit in the u32
        // of `struct blksnap_cbtinfo`.
        if min < SECTOR_SHIFT || max > 31 || min > max || max_count == 0 {
            return Err(CbtError::BadParams);
        }
        let mut shift = min;
        let mut count = blocks_for(capacity_sectors, shift);
        while count > u64::from(max_count) && shift < max {
            shift += 1;
            count = blocks_for(capacity_sectors, shift);
        }
        let block_count = u32::try_from(count).map_err(|_| CbtError::TooLarge)?;
        Ok(Self {
            capacity_sectors,
            block_shift: shift,
            block_count,
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// Device size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors << SECTOR_SHIFT
    }

    /// The blocks touched by `count` sectors from `sector`, clipped to the
    /// device. Returns an empty range when nothing of the device is touched.
    pub fn blocks_touched(&self, sector: u64, count: u64) -> Range<usize> {
        let end = sector.saturating_add(count).min(self.capacity_sectors);
        if count == 0 || sector >= end {
            return 0..0;
        }
        let shift = self.block_shift - SECTOR_SHIFT;
        let first = (sector >> shift) as usize;
        let last = ((end - 1) >> shift) as usize;
        first..last + 1
    }

    /// Checks a range given by user space: non-empty and inside the device.
    pub fn check_range(&self, sector: u64, count: u64) -> Result<Range<usize>, CbtError> {
        match sector.checked_add(count) {
            Some(end) if count > 0 && end <= self.capacity_sectors => {
                Ok(self.blocks_touched(sector, count))
            }
            _ => Err(CbtError::BadRange),
        }
    }

    /// Checks a read of `length` map bytes from `offset`.
    pub fn check_map_read(&self, offset: u32, length: u32) -> Result<Range<usize>, CbtError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.block_count => Ok(offset as usize..end as usize),
            _ => Err(CbtError::OutOfMap),
        }
    }
}

/// Sorts `ranges` and merges those that overlap or touch, in place: the
/// first of the returned count of ranges cover the same blocks as all of
/// them did, in order and apart. So marking them is one pass over the map
/// at most, however often the ranges given overlapped. Empty ranges go.
pub fn merge_ranges(ranges: &mut [Range<usize>]) -> usize {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out = 0;
    for i in 0..ranges.len() {
        let r = ranges[i].clone();
        if r.is_empty() {
            continue;
        }
        if out > 0 && r.start <= ranges[out - 1].end {
            if r.end > ranges[out - 1].end {
                ranges[out - 1].end = r.end;
            }
        } else {
            ranges[out] = r;
            out += 1;
        }
    }
    out
}

/// Raises every block of `blocks` in `map` to at least `number`.
pub fn mark(map: &mut [u8], blocks: Range<usize>, number: u8) {
    for b in &mut map[blocks] {
        if *b < number {
            *b = number;
        }
    }
}

/// The snapshot numbers and generation of a tracked device.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CbtState {
    /// Number written to the active map for changes happening now.
    pub active: u8,
    /// Number of the last snapshot taken in this generation, 0 if none.
    pub previous: u8,
    /// Identifier of the generation.
    pub generation: [u8; 16],
}

impl CbtState {
    /// The state of a freshly attached tracker.
    pub fn new(generation: [u8; 16]) -> Self {
        Self {
            active: 1,
            previous: 0,
            generation,
        }
    }

    /// Takes a snapshot: the read map becomes a copy of the active map and
    /// the numbers advance. When the numbers are exhausted a new generation
    /// starts with cleared maps, and `new_generation` supplies its id.
    /// Returns true if a new generation started.
    pub fn take_snapshot(
        &mut self,
        active_map: &mut [u8],
        read_map: &mut [u8],
        new_generation: impl FnOnce() -> [u8; 16],
    ) -> bool {
        if self.active == MAX_SNAPSHOT_NUMBER {
            active_map.fill(0);
            read_map.fill(0);
            *self = Self::new(new_generation());
            return true;
        }
        read_map.copy_from_slice(active_map);
        self.previous = self.active;
        self.active += 1;
        false
    }

    /// Marks blocks changed by a write.
    pub fn mark_write(&self, active_map: &mut [u8], blocks: Range<usize>) {
        mark(active_map, blocks, self.active);
    }

    /// Marks blocks dirty on request of user space: in the active map, and
    /// in the read map as changed in the last snapshot, so that the next
    /// backup as well as one made from the current read map copy them.
    pub fn mark_dirty(&self, active_map: &mut [u8], read_map: &mut [u8], blocks: Range<usize>) {
        mark(active_map, blocks.clone(), self.active);
        if self.previous > 0 {
            mark(read_map, blocks, self.previous);
        }
    }
}
