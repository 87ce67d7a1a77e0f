// SPDX-License-Identifier: GPL-2.0

//! Chunk arithmetic for copy-on-write, shared by the kernel module and the
//! host tests.
//!
//! A snapshotted device is cut into chunks of a power-of-two size: the unit
//! that is copied to the difference storage on the first write after the
//! snapshot was taken, like the chunk of dm-snapshot.

use core::ops::Range;

/// Shift from bytes to 512-byte sectors.
pub const SECTOR_SHIFT: u32 = 9;

/// Module parameters that choose the chunk size.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkParams {
    /// Smallest chunk size, as a power of two in bytes.
    pub minimum_shift: u32,
    /// The chunk grows until the device has at most 2^this chunks...
    pub maximum_count_shift: u32,
    /// ...or until the chunk size reaches this power of two.
    pub maximum_shift: u32,
}

impl ChunkParams {
    /// The upstream defaults: 256 KiB chunks, at most 2^40 of them, at most
    /// 64 MiB per chunk.
    pub const DEFAULT: Self = Self {
        minimum_shift: 18,
        maximum_count_shift: 40,
        maximum_shift: 26,
    };
}

/// Errors of the chunk arithmetic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ChunkError {
    /// The parameters or the device's block size describe no valid chunk.
    BadParams,
}

/// How a device is cut into chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChunkGeometry {
    /// Device size in sectors when the snapshot was taken.
    pub capacity_sectors: u64,
    /// Chunk size as a power of two in bytes.
    pub shift: u32,
    /// Number of chunks; the last one may be partial.
    pub count: u64,
}

/// A piece of an I/O that lies within one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Piece {
    /// The chunk.
    pub chunk: u64,
    /// First sector of the piece on the device.
    pub sector: u64,
    /// Length of the piece in sectors.
    pub sectors: u64,
}

impl ChunkGeometry {
    /// Chooses the chunk size for a device of `capacity_sectors` sectors
    /// whose logical block size is `block_size` bytes: the smallest power of
    /// two from `minimum_shift`, at least the block size, for which the
    /// device has at most 2^`maximum_count_shift` chunks, but not above
    /// `maximum_shift` unless the block size needs it.
    pub fn new(
        capacity_sectors: u64,
        block_size: u32,
        params: &ChunkParams,
    ) -> Result<Self, ChunkError> {
        let ChunkParams {
            minimum_shift: min,
            maximum_count_shift: max_count,
            maximum_shift: max,
        } = *params;
        if min < SECTOR_SHIFT
            || min > max
            || max > 30
            || max_count > 63
            || !block_size.is_power_of_two()
        {
            return Err(ChunkError::BadParams);
        }
        let mut shift = min.max(block_size.trailing_zeros());
        if shift > 30 {
            return Err(ChunkError::BadParams);
        }
        while shift < max && chunks_for(capacity_sectors, shift) > 1u64 << max_count {
            shift += 1;
        }
        Ok(Self {
            capacity_sectors,
            shift,
            count: chunks_for(capacity_sectors, shift),
        })
    }

    /// Chunk size in bytes.
    pub fn chunk_bytes(&self) -> u32 {
        1 << self.shift
    }

    /// Chunk size in sectors.
    pub fn chunk_sectors(&self) -> u64 {
        1 << (self.shift - SECTOR_SHIFT)
    }

    /// The sectors of `chunk`, clipped to the device.
    pub fn chunk_span(&self, chunk: u64) -> Range<u64> {
        let start = chunk << (self.shift - SECTOR_SHIFT);
        start..(start + self.chunk_sectors()).min(self.capacity_sectors)
    }

    /// The chunks touched by `count` sectors from `sector`, clipped to the
    /// device.
    pub fn chunks_touched(&self, sector: u64, count: u64) -> Range<u64> {
        let end = sector.saturating_add(count).min(self.capacity_sectors);
        if count == 0 || sector >= end {
            return 0..0;
        }
        let s = self.shift - SECTOR_SHIFT;
        (sector >> s)..((end - 1) >> s) + 1
    }

    /// Splits `count` sectors from `sector` at chunk borders, clipped to the
    /// device.
    pub fn pieces(&self, sector: u64, count: u64) -> Pieces {
        let end = sector.saturating_add(count).min(self.capacity_sectors);
        Pieces {
            geometry: *self,
            next: sector.min(end),
            end,
        }
    }
}

fn chunks_for(capacity_sectors: u64, shift: u32) -> u64 {
    capacity_sectors.div_ceil(1 << (shift - SECTOR_SHIFT))
}

/// Iterator over the pieces of an I/O, see [`ChunkGeometry::pieces`].
#[derive(Clone, Debug)]
pub struct Pieces {
    geometry: ChunkGeometry,
    next: u64,
    end: u64,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.next >= self.end {
            return None;
        }
        let chunk = self.next >> (self.geometry.shift - SECTOR_SHIFT);
        let chunk_end = self.geometry.chunk_span(chunk).end;
        let piece = Piece {
            chunk,
            sector: self.next,
            sectors: chunk_end.min(self.end) - self.next,
        };
        self.next += piece.sectors;
        Some(piece)
    }
}

/// Where a chunk's snapshot content is: its state in copy-on-write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Content {
    /// Still on the device: nothing wrote to the chunk yet.
    Origin,
    /// Being read from the device, to be copied to the storage.
    Copying,
    /// Read into memory, being written to the storage: the device may
    /// change, image reads wait until it is stored.
    Buffered,
    /// In the storage, at this address (in sectors, below 2^61).
    Stored(u64),
    /// Lost: the copy failed.
    Failed,
}

/// Bytes of copy-on-write state per chunk in [`Content::pack`]ed form.
pub const PACKED_BYTES: u64 = 8;

impl Content {
    const TAG_BITS: u32 = 3;
    const STORED: u64 = 4;

    /// The largest storage address [`Content::Stored`] can hold.
    pub const MAX_ADDRESS: u64 = u64::MAX >> Self::TAG_BITS;

    /// The content as one `u64`, for a dense array of all chunks: 0 is
    /// [`Content::Origin`], so a zeroed array starts a snapshot. `None` for
    /// an address above [`Content::MAX_ADDRESS`].
    pub fn pack(self) -> Option<u64> {
        Some(match self {
            Content::Origin => 0,
            Content::Copying => 1,
            Content::Buffered => 2,
            Content::Failed => 3,
            Content::Stored(at) if at <= Self::MAX_ADDRESS => (at << Self::TAG_BITS) | Self::STORED,
            Content::Stored(_) => return None,
        })
    }

    /// The content [`Content::pack`] made `v` of. Values it never makes
    /// read as [`Content::Failed`].
    pub fn unpack(v: u64) -> Self {
        match v & ((1 << Self::TAG_BITS) - 1) {
            0 => Content::Origin,
            1 => Content::Copying,
            2 => Content::Buffered,
            Self::STORED => Content::Stored(v >> Self::TAG_BITS),
            _ => Content::Failed,
        }
    }

    /// True if writes to the chunk may go to the device, as far as its
    /// content goes: the old data is safe (or lost for good).
    pub fn lets_writes_pass(self) -> bool {
        matches!(
            self,
            Content::Stored(_) | Content::Failed | Content::Buffered
        )
    }
}

impl ChunkGeometry {
    /// Bytes of the dense copy-on-write state of a device of this geometry.
    pub fn state_bytes(&self) -> u64 {
        self.count.saturating_mul(PACKED_BYTES)
    }
}
