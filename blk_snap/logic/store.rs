// SPDX-License-Identifier: GPL-2.0

//! Space accounting of a difference storage, shared by the kernel module and
//! the host tests.
//!
//! Chunks are stored one after another. A storage has `available` sectors
//! now and may grow, in steps, up to `limit` sectors (a file that is extended
//! with fallocate; a block device cannot grow).

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

/// The next free place in a storage made of several extents.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Cursor {
    /// Index of the extent.
    pub extent: usize,
    /// Sectors used in it.
    pub used: u64,
}

/// Places `sectors` in the extents whose lengths are `lengths`, from
/// `cursor` on. A piece never straddles two extents: when the rest of an
/// extent is too small, it stays unused and the next extent is tried.
/// Returns the extent, the offset in it, and the cursor after the piece.
pub fn place(lengths: &[u64], cursor: Cursor, sectors: u64) -> Option<(usize, u64, Cursor)> {
    let mut c = cursor;
    while c.extent < lengths.len() {
        if lengths[c.extent] - c.used.min(lengths[c.extent]) >= sectors {
            let at = c.used;
            return Some((
                c.extent,
                at,
                Cursor {
                    extent: c.extent,
                    used: at + sectors,
                },
            ));
        }
        c = Cursor {
            extent: c.extent + 1,
            used: 0,
        };
    }
    None
}

/// Sectors still free from `cursor` on, counting the rests of extents.
pub fn free_from(lengths: &[u64], cursor: Cursor) -> u64 {
    lengths
        .iter()
        .enumerate()
        .skip(cursor.extent)
        .map(|(i, &l)| {
            if i == cursor.extent {
                l.saturating_sub(cursor.used)
            } else {
                l
            }
        })
        .sum()
}
