// SPDX-License-Identifier: GPL-2.0

//! The fine change map of a tracked device: which 4 KiB blocks were written
//! in each interval between two takes, beside the coarse CBT map whose
//! blocks are 64 KiB and more. The arithmetic is in [`crate::fine`].
//!
//! The active interval records the writes happening now. A take freezes it
//! under the number its writes carry in the coarse map and starts an empty
//! one: a swap, no copy. The last [`FROZEN_MAX`] frozen intervals are kept,
//! so that an incremental backup whose previous backup is a few takes old
//! is still told its blocks exactly.
//!
//! Memory is bounded: the containers of all intervals together take at most
//! `limit` bytes. A container that would go past it, or that cannot get
//! memory in the write path (which may not sleep), is marked lost: reads of
//! its blocks say "unknown", and user space copies the coarse blocks there.
//! Less precision, never a missed change.

use crate::fine::{
    array_capacity, array_insert, array_len_with, array_to_bitmap, bitmap_has, bitmap_set, pieces,
    whole, ARRAY_MAX, BITMAP_WORDS, CONTAINER_BLOCKS, CONTAINER_SHIFT,
};
use core::ops::Range;
use kernel::{
    alloc::{flags::GFP_KERNEL, flags::GFP_NOWAIT, KVVec, KVec},
    prelude::*,
};

/// Frozen intervals kept.
pub(crate) const FROZEN_MAX: usize = 4;

/// What a fine map says of a block.
pub(crate) mod answer {
    /// Not written in the intervals asked about.
    pub(crate) const CLEAN: u8 = 0;
    /// Written.
    pub(crate) const WRITTEN: u8 = 1;
    /// Not known: ask the coarse map.
    pub(crate) const UNKNOWN: u8 = 2;
}

/// The blocks written in one container of one interval.
enum Container {
    /// Sorted offsets in `buf[..len]`; `buf` is the allocation.
    Array { buf: KVec<u16>, len: usize },
    /// One bit per block.
    Bitmap(KVec<u64>),
    /// Every block written (a write or discard that covered it all).
    Full,
    /// Given up: past the memory limit, or no memory.
    Lost,
}

impl Container {
    fn bytes(&self) -> usize {
        match self {
            Container::Array { buf, .. } => buf.len() * 2,
            Container::Bitmap(b) => b.len() * 8,
            Container::Full | Container::Lost => 0,
        }
    }

    /// What it says of offset `v`.
    fn answer(&self, v: u32) -> u8 {
        let has = match self {
            Container::Array { buf, len } => crate::fine::array_has(&buf[..*len], v),
            Container::Bitmap(b) => bitmap_has(b, v),
            Container::Full => true,
            Container::Lost => return answer::UNKNOWN,
        };
        if has {
            answer::WRITTEN
        } else {
            answer::CLEAN
        }
    }
}

/// The writes of one interval between takes.
pub(crate) struct Interval {
    /// The number the coarse map gave these writes.
    number: u8,
    /// One slot per container of the device; `None` where nothing was
    /// written.
    slots: KVVec<Option<Container>>,
    /// Bytes of its containers.
    bytes: usize,
}

impl Interval {
    /// An empty interval for a map of `containers` containers. Sleeps.
    fn new(containers: usize) -> Result<Self> {
        let mut slots = KVVec::with_capacity(containers, GFP_KERNEL)?;
        for _ in 0..containers {
            slots.push(None, GFP_KERNEL)?;
        }
        Ok(Self {
            number: 0,
            slots,
            bytes: 0,
        })
    }

    /// Records the offsets `r` of container `c`. Never sleeps; `room` is
    /// what the limit leaves for growth.
    fn mark(&mut self, c: usize, r: &Range<u32>, room: usize) {
        let Some(slot) = self.slots.get_mut(c) else {
            return;
        };
        let before = slot.as_ref().map_or(0, Container::bytes);
        let next = match slot.take() {
            // A lost container stays lost: it may have missed writes.
            Some(Container::Lost) => Container::Lost,
            _ if whole(r) => Container::Full,
            None => grow_array(&[], r, room),
            Some(Container::Array { mut buf, len }) => {
                let need = array_len_with(&buf[..len], r);
                if need <= buf.len() {
                    let len = array_insert(&mut buf, len, r);
                    Container::Array { buf, len }
                } else {
                    grow_array(&buf[..len], r, room + buf.len() * 2)
                }
            }
            Some(Container::Bitmap(mut b)) => {
                bitmap_set(&mut b, r);
                Container::Bitmap(b)
            }
            Some(Container::Full) => Container::Full,
        };
        self.bytes = self.bytes - before + next.bytes();
        *slot = Some(next);
    }

    /// Gives up on container `c`.
    fn lose(&mut self, c: usize) {
        if let Some(slot) = self.slots.get_mut(c) {
            self.bytes -= slot.as_ref().map_or(0, Container::bytes);
            // Freed here: a `KVec` from kmalloc, fine under a spinlock.
            *slot = Some(Container::Lost);
        }
    }

    /// Raises `out[i]` to what this interval says of block `first + i`.
    fn answer(&self, first: u64, out: &mut [u8]) {
        let mut pos = first;
        let end = first + out.len() as u64;
        while pos < end {
            let c = pos >> CONTAINER_SHIFT;
            let stop = end.min((c + 1) << CONTAINER_SHIFT);
            let part = &mut out[(pos - first) as usize..(stop - first) as usize];
            match self.slots.get(c as usize) {
                Some(None) => {}
                Some(Some(Container::Lost)) | None => part.fill(answer::UNKNOWN),
                Some(Some(k)) => {
                    let base = (pos & (CONTAINER_BLOCKS - 1)) as u32;
                    for (i, a) in part.iter_mut().enumerate() {
                        *a = (*a).max(k.answer(base + i as u32));
                    }
                }
            }
            pos = stop;
        }
    }
}

/// A container holding `old` and `r`, as an array if it fits in
/// [`ARRAY_MAX`] entries, else as a bitmap; lost if that takes more than
/// `room` bytes or memory is short.
fn grow_array(old: &[u16], r: &Range<u32>, room: usize) -> Container {
    let need = array_len_with(old, r);
    if need > ARRAY_MAX {
        if BITMAP_WORDS * 8 > room {
            return Container::Lost;
        }
        let Ok(mut b) = KVec::from_elem(0u64, BITMAP_WORDS, GFP_NOWAIT) else {
            return Container::Lost;
        };
        array_to_bitmap(old, &mut b);
        bitmap_set(&mut b, r);
        return Container::Bitmap(b);
    }
    let cap = array_capacity(need);
    if cap * 2 > room {
        return Container::Lost;
    }
    let Ok(mut buf) = KVec::from_elem(0u16, cap, GFP_NOWAIT) else {
        return Container::Lost;
    };
    buf[..old.len()].copy_from_slice(old);
    let len = array_insert(&mut buf, old.len(), r);
    Container::Array { buf, len }
}

/// A fresh interval and room for the intervals a take lets go of, allocated
/// before the take so that it cannot fail.
pub(crate) struct Prepared {
    fresh: Interval,
    spare: KVec<Interval>,
}

impl Prepared {
    /// For a map of `containers` containers. Sleeps.
    pub(crate) fn new(containers: usize) -> Result<Self> {
        Ok(Self {
            fresh: Interval::new(containers)?,
            spare: KVec::with_capacity(FROZEN_MAX + 1, GFP_KERNEL)?,
        })
    }
}

/// The intervals a take let go of: dropped by the caller once it released
/// its spinlock (their slots may be vmalloc'ed).
pub(crate) struct Dropped(#[allow(dead_code)] KVec<Interval>);

/// The fine map of one device.
pub(crate) struct FineMap {
    /// Sector shift of a fine block.
    shift: u32,
    /// Fine blocks of the device.
    blocks: u64,
    /// Bytes the containers may take.
    limit: usize,
    /// Bytes they take.
    bytes: usize,
    active: Interval,
    /// Oldest first.
    frozen: KVec<Interval>,
}

impl FineMap {
    /// The map of a device of `capacity_sectors` with fine blocks of
    /// `shift`, its containers limited to `limit` bytes. Sleeps.
    pub(crate) fn new(capacity_sectors: u64, shift: u32, limit: usize) -> Result<Self> {
        let blocks = capacity_sectors.div_ceil(1 << shift);
        let containers = usize::try_from(blocks.div_ceil(CONTAINER_BLOCKS))?;
        Ok(Self {
            shift,
            blocks,
            limit,
            bytes: 0,
            active: Interval::new(containers)?,
            frozen: KVec::with_capacity(FROZEN_MAX + 1, GFP_KERNEL)?,
        })
    }

    /// Sector shift of a fine block.
    pub(crate) fn shift(&self) -> u32 {
        self.shift
    }

    /// Fine blocks of the device.
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Bytes the containers take, and the limit.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.bytes, self.limit)
    }

    /// Allocates what the next [`Self::take`] needs. Sleeps.
    pub(crate) fn prepare(&self) -> Result<Prepared> {
        Prepared::new(self.containers())
    }

    /// Containers of the device.
    pub(crate) fn containers(&self) -> usize {
        self.active.slots.len()
    }

    /// Records a write of `count` sectors at `sector`. Never sleeps.
    pub(crate) fn mark(&mut self, sector: u64, count: u64) {
        for (c, r) in pieces(sector, count, self.shift) {
            let room = self.limit.saturating_sub(self.bytes);
            let before = self.active.bytes;
            self.active.mark(c as usize, &r, room);
            self.bytes = self.bytes - before + self.active.bytes;
        }
    }

    /// Makes the containers of `count` sectors at `sector` unknown in the
    /// active interval and in the frozen one numbered `previous`: what
    /// user space marked dirty is copied by coarse blocks.
    pub(crate) fn lose(&mut self, sector: u64, count: u64, previous: u8) {
        for (c, _) in pieces(sector, count, self.shift) {
            let c = c as usize;
            self.bytes -= self.active.bytes;
            self.active.lose(c);
            self.bytes += self.active.bytes;
            for f in self.frozen.iter_mut().filter(|f| f.number == previous) {
                self.bytes -= f.bytes;
                f.lose(c);
                self.bytes += f.bytes;
            }
        }
    }

    /// A take: the active interval is frozen as number `number` and
    /// `prepared`'s empty one goes on. With `restart` (a new generation),
    /// every frozen interval goes. Never sleeps; drop what it returns after
    /// the spinlock.
    pub(crate) fn take(&mut self, prepared: Prepared, number: u8, restart: bool) -> Dropped {
        let Prepared { fresh, mut spare } = prepared;
        let mut old = core::mem::replace(&mut self.active, fresh);
        old.number = number;
        // Cannot fail: both have room for FROZEN_MAX + 1.
        if restart {
            while let Some(f) = self.frozen.pop() {
                let _ = spare.push(f, GFP_NOWAIT);
            }
            let _ = spare.push(old, GFP_NOWAIT);
        } else {
            let _ = self.frozen.push(old, GFP_NOWAIT);
            if self.frozen.len() > FROZEN_MAX {
                if let Some(gone) = self.frozen.remove(0) {
                    let _ = spare.push(gone, GFP_NOWAIT);
                }
            }
        }
        self.bytes = self.frozen.iter().map(|f| f.bytes).sum::<usize>() + self.active.bytes;
        Dropped(spare)
    }

    /// Fills `out` with what the map says of the blocks from `first` for the
    /// writes after the take numbered `since` up to the last take, numbered
    /// `previous`. Never sleeps.
    pub(crate) fn answer(&self, since: u8, previous: u8, first: u64, out: &mut [u8]) {
        out.fill(answer::CLEAN);
        for n in since.saturating_add(1)..=previous {
            match self.frozen.iter().find(|f| f.number == n) {
                Some(f) => f.answer(first, out),
                None => {
                    // That interval is gone (or never was: tracking began
                    // after it): only the coarse map knows.
                    out.fill(answer::UNKNOWN);
                    return;
                }
            }
        }
    }
}
