// SPDX-License-Identifier: GPL-2.0

//! The change block tracking map of a tracked device.
//!
//! The arithmetic lives in [`crate::cbt`], which the host tests cover; this
//! file owns the two byte maps, the fine map of 4 KiB blocks
//! ([`crate::fine_map`]) and the lock that the submit path takes.
//!
//! The map is sized for the device's capacity when tracking starts. If the
//! capacity changed when a snapshot is taken, the map starts over with the
//! new size and a new generation, like upstream: user space sees the new
//! generation and knows that its earlier change numbers are void.

use crate::cbt::{merge_ranges, CbtError, CbtGeometry, CbtParams, CbtState};
use crate::fine_map::{self, FineMap};
use crate::params;
use crate::persist_format::{
    check_restore, record_len, Now, RecordHeader, Refusal, IDENTITY_LEN, ID_LEN, RECORD_HEADER_LEN,
};
use core::ops::Range;
use kernel::{
    alloc::{flags::GFP_KERNEL, KVVec, KVec},
    error::code::*,
    new_spinlock,
    prelude::*,
    sync::SpinLock,
    time::{ktime_ms_delta, msleep, Ktime},
    uaccess::UserSliceWriter,
    uuid::Uuid,
};

/// Which of the two maps to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Map {
    /// The map as of the last snapshot (`BLKFILTER_CTL_BLKSNAP_CBTMAP`).
    Read,
    /// The map recording changes now (our `CBTMAP_ACTIVE` extension).
    Active,
}

struct Maps {
    geometry: CbtGeometry,
    state: CbtState,
    active: KVVec<u8>,
    read: KVVec<u8>,
    fine: FineMap,
    /// Its state was saved clean (see [`crate::persist`]): nothing may
    /// change the maps or numbers until the saved state is marked broken.
    sealed: bool,
}

/// The CBT map of one device.
#[pin_data]
pub(crate) struct CbtMap {
    #[pin]
    maps: SpinLock<Maps>,
}

/// A consistent copy of the map's metadata.
pub(crate) struct CbtInfo {
    pub(crate) geometry: CbtGeometry,
    pub(crate) state: CbtState,
}

/// Empty maps for a device whose capacity changed, allocated before the
/// snapshot is taken so that the switch itself cannot fail.
pub(crate) struct Reset {
    geometry: CbtGeometry,
    active: KVVec<u8>,
    read: KVVec<u8>,
    fine: FineMap,
}

/// What a take needs allocated before it: a reset if the capacity changed,
/// and the fine map's next interval.
pub(crate) struct Prepared {
    reset: Option<Reset>,
    fine: fine_map::Prepared,
}

/// Whether `maps` saw no write and no take since tracking started.
fn fresh(maps: &Maps) -> bool {
    maps.state.active == 1 && maps.state.previous == 0 && maps.active.iter().all(|&b| b == 0)
}

/// Bytes copied to user space per lock hold when reading a map.
const COPY_CHUNK: usize = 16 * 1024;

/// Blocks marked per hold of the lock by [`CbtMap::mark_dirty`]: a write to
/// the device waits for at most this many byte updates (microseconds).
const MARK_BATCH: usize = 4096;

/// How long [`CbtMap::mark_dirty`] works before it sleeps a moment: the
/// kernel may not preempt it, and other tasks must run.
const MARK_SLICE_MS: i64 = 10;

fn geometry_for(capacity_sectors: u64, params: &CbtParams) -> Result<CbtGeometry> {
    CbtGeometry::new(capacity_sectors, params).map_err(|e| {
        pr_err!(
            "cannot track {} sectors with {:?}: {:?}\n",
            capacity_sectors,
            params,
            e
        );
        EINVAL
    })
}

impl CbtMap {
    /// Creates the map of a device of `capacity_sectors` sectors, whose fine
    /// blocks have the sector shift `fine_shift`.
    pub(crate) fn new(
        capacity_sectors: u64,
        params: &CbtParams,
        fine_shift: u32,
    ) -> Result<impl PinInit<Self, Error>> {
        let geometry = geometry_for(capacity_sectors, params)?;
        let n = geometry.block_count as usize;
        let active = KVVec::from_elem(0u8, n, GFP_KERNEL)?;
        let read = KVVec::from_elem(0u8, n, GFP_KERNEL)?;
        let fine = FineMap::new(capacity_sectors, fine_shift, params::fine_map_limit())?;
        let state = CbtState::new(*Uuid::new_random().as_bytes());
        Ok(try_pin_init!(Self {
            maps <- new_spinlock!(
                Maps { geometry, state, active, read, fine, sealed: false },
                "CbtMap::maps"
            ),
        }))
    }

    /// The current geometry.
    pub(crate) fn geometry(&self) -> CbtGeometry {
        self.maps.lock().geometry
    }

    /// Records a write of `count` sectors at `sector`. Called from the submit
    /// path: takes a spinlock, never sleeps.
    pub(crate) fn mark_write(&self, sector: u64, count: u64) {
        let mut maps = self.maps.lock();
        let Maps {
            geometry,
            state,
            active,
            ..
        } = &mut *maps;
        let blocks = geometry.blocks_touched(sector, count);
        if !blocks.is_empty() {
            state.mark_write(active, blocks);
        }
        maps.fine.mark(sector, count);
    }

    /// Checks a user-supplied sector range and returns its blocks.
    pub(crate) fn check_range(&self, sector: u64, count: u64) -> Result<Range<usize>, CbtError> {
        self.geometry().check_range(sector, count)
    }

    /// Marks block ranges dirty in both maps. Ranges checked against an
    /// older geometry are clipped to the map. Sleeps.
    ///
    /// The ranges are merged first, so however often they overlap, each
    /// block is marked once; the lock that the write path takes is held for
    /// [`MARK_BATCH`] blocks at a time, and the work pauses every
    /// [`MARK_SLICE_MS`]. Reorders `ranges`. A sealed map is unsealed with
    /// `unseal` (which marks its saved state broken, synchronously) before
    /// anything changes.
    pub(crate) fn mark_dirty(&self, ranges: &mut [Range<usize>], unseal: impl Fn()) {
        let n = merge_ranges(ranges);
        let mut since = Ktime::ktime_get();
        for blocks in ranges[..n].iter() {
            let mut pos = blocks.start;
            while pos < blocks.end {
                let end = blocks.end.min(pos.saturating_add(MARK_BATCH));
                {
                    let mut maps = self.maps.lock();
                    if maps.sealed {
                        drop(maps);
                        unseal();
                        let mut maps = self.maps.lock();
                        if maps.sealed {
                            // The state was not registered any more.
                            pr_err!("a sealed CBT map was not unsealed\n");
                            maps.sealed = false;
                        }
                        continue;
                    }
                    let Maps {
                        geometry,
                        state,
                        active,
                        read,
                        fine,
                        ..
                    } = &mut *maps;
                    let len = active.len();
                    let blocks = pos.min(len)..end.min(len);
                    state.mark_dirty(active, read, blocks.clone());
                    // Copied by coarse blocks: the fine map does not know
                    // them (the containers they touch become unknown).
                    let shift = geometry.block_shift - 9;
                    let sector = (blocks.start as u64) << shift;
                    let count = ((blocks.end - blocks.start) as u64) << shift;
                    fine.lose(sector, count, state.previous);
                }
                pos = end;
                if ktime_ms_delta(Ktime::ktime_get(), since) >= MARK_SLICE_MS {
                    msleep(1);
                    since = Ktime::ktime_get();
                }
            }
        }
    }

    /// Whether the map is sealed: its state was saved clean.
    pub(crate) fn is_sealed(&self) -> bool {
        self.maps.lock().sealed
    }

    /// Lifts the seal, once the saved state was marked broken.
    pub(crate) fn unseal(&self) {
        self.maps.lock().sealed = false;
    }

    /// Whether the map saw no write and no take since tracking started.
    pub(crate) fn is_fresh(&self) -> bool {
        fresh(&self.maps.lock())
    }

    /// Allocates what the next take needs: a reset if the device no longer
    /// has the capacity the map was made for, and the fine map's next
    /// interval. May sleep.
    pub(crate) fn prepare_take(
        &self,
        capacity_sectors: u64,
        params: &CbtParams,
    ) -> Result<Prepared> {
        let reset = self.prepare_reset(capacity_sectors, params)?;
        let fine = match &reset {
            Some(r) => r.fine.prepare()?,
            None => {
                let containers = self.maps.lock().fine.containers();
                fine_map::Prepared::new(containers)?
            }
        };
        Ok(Prepared { reset, fine })
    }

    fn prepare_reset(&self, capacity_sectors: u64, params: &CbtParams) -> Result<Option<Reset>> {
        let (old, fine_shift) = {
            let maps = self.maps.lock();
            (maps.geometry, maps.fine.shift())
        };
        if old.capacity_sectors == capacity_sectors {
            return Ok(None);
        }
        let geometry = geometry_for(capacity_sectors, params)?;
        let n = geometry.block_count as usize;
        pr_info!(
            "the capacity changed from {} to {} sectors: the CBT map starts over\n",
            old.capacity_sectors,
            capacity_sectors
        );
        Ok(Some(Reset {
            geometry,
            active: KVVec::from_elem(0u8, n, GFP_KERNEL)?,
            read: KVVec::from_elem(0u8, n, GFP_KERNEL)?,
            fine: FineMap::new(capacity_sectors, fine_shift, params::fine_map_limit())?,
        }))
    }

    /// Takes a snapshot: the read map becomes a copy of the active map and
    /// the numbers advance, or a new generation starts (with a reset, or
    /// when the numbers are exhausted). The fine map's active interval is
    /// frozen under the number its writes carry.
    pub(crate) fn take_snapshot(&self, prepared: Prepared) {
        // The maps a reset replaces, and the fine intervals let go of, are
        // freed outside the spinlock.
        let Prepared { reset, fine } = prepared;
        let mut old = reset;
        let (exhausted, dropped) = {
            let mut maps = self.maps.lock();
            // The take broke the seal before it held the writes.
            if maps.sealed {
                pr_err!("a take changes a sealed CBT map\n");
                maps.sealed = false;
            }
            let restarted = old.is_some();
            if let Some(r) = old.as_mut() {
                maps.geometry = core::mem::replace(&mut r.geometry, maps.geometry);
                core::mem::swap(&mut maps.active, &mut r.active);
                core::mem::swap(&mut maps.read, &mut r.read);
                core::mem::swap(&mut maps.fine, &mut r.fine);
                maps.state = CbtState::new(*Uuid::new_random().as_bytes());
            }
            let Maps {
                state,
                active,
                read,
                fine: fine_map,
                ..
            } = &mut *maps;
            let number = state.active;
            let exhausted = state.take_snapshot(active, read, || *Uuid::new_random().as_bytes());
            let dropped = fine_map.take(fine, number, restarted || exhausted);
            (exhausted, dropped)
        };
        drop(dropped);
        drop(old);
        if exhausted {
            pr_info!("change numbers exhausted: new CBT generation\n");
        }
    }

    /// The fine map's block shift (sectors), its block count, and the bytes
    /// its containers take and may take.
    pub(crate) fn fine_info(&self) -> (u32, u64, usize, usize) {
        let maps = self.maps.lock();
        let (bytes, limit) = maps.fine.usage();
        (maps.fine.shift(), maps.fine.blocks(), bytes, limit)
    }

    /// Copies to user space what the fine map says of `count` fine blocks
    /// from `first` for the writes after the take numbered `since` up to
    /// the last take (see [`fine_map::answer`]). Fails with `ENODATA` if
    /// the blocks are not all on the device (which may have changed size).
    pub(crate) fn fine_to_user(
        &self,
        since: u8,
        first: u64,
        count: u64,
        out: &mut UserSliceWriter,
    ) -> Result {
        let mut bounce = KVec::from_elem(0u8, COPY_CHUNK, GFP_KERNEL)?;
        let mut pos = first;
        let end = first.checked_add(count).ok_or(EINVAL)?;
        while pos < end {
            let len = (end - pos).min(COPY_CHUNK as u64) as usize;
            {
                let maps = self.maps.lock();
                if end > maps.fine.blocks() {
                    return Err(ENODATA);
                }
                maps.fine
                    .answer(since, maps.state.previous, pos, &mut bounce[..len]);
            }
            out.write_slice(&bounce[..len])?;
            pos += len as u64;
        }
        Ok(())
    }

    /// The device's record for the CBT state device: the record header
    /// under `id`, completed by `fill`, then `extra` (the fingerprint), the
    /// active and the read map, padded to 8 bytes. The maps are copied at
    /// once under the lock, and sealed with it, so the record is one point
    /// in time and nothing changes it unnoticed. Sleeps (to allocate).
    pub(crate) fn save_record(
        &self,
        id: &[u8; ID_LEN],
        fill: impl Fn(&mut RecordHeader),
        extra: &[u8],
    ) -> Result<KVVec<u8>> {
        loop {
            let g = self.geometry();
            let n = g.block_count as usize;
            let mut h = RecordHeader {
                id: *id,
                capacity_sectors: g.capacity_sectors,
                block_shift: g.block_shift,
                flags: 0,
                block_count: u64::from(g.block_count),
                active: 0,
                previous: 0,
                generation: [0; 16],
                identity: [0; IDENTITY_LEN],
                start_sector: 0,
                partno: 0,
                proof: 0,
                regions: 0,
                fingerprint_len: 0,
            };
            fill(&mut h);
            let len =
                record_len(u64::from(g.block_count), h.regions, h.fingerprint_len).ok_or(ENOMEM)?;
            let maps_at = RECORD_HEADER_LEN + extra.len();
            if maps_at + 2 * n > len {
                return Err(EINVAL);
            }
            let mut buf = KVVec::from_elem(0u8, len, GFP_KERNEL)?;
            buf[RECORD_HEADER_LEN..maps_at].copy_from_slice(extra);
            let mut maps = self.maps.lock();
            if maps.geometry != g {
                // A take started over with a new size meanwhile.
                continue;
            }
            h.active = maps.state.active;
            h.previous = maps.state.previous;
            h.generation = maps.state.generation;
            buf[..RECORD_HEADER_LEN].copy_from_slice(&h.encode());
            buf[maps_at..maps_at + n].copy_from_slice(&maps.active);
            buf[maps_at + n..maps_at + 2 * n].copy_from_slice(&maps.read);
            maps.sealed = true;
            drop(maps);
            return Ok(buf);
        }
    }

    /// Replaces the state of a freshly attached device with one saved at
    /// the last shutdown (`clean`: it was saved clean and not broken
    /// since), if [`check_restore`] allows it with `now` and the geometry
    /// and freshness checked under the lock that writes take, so no write
    /// can slip between the check and the switch. The fingerprint was
    /// compared by the caller. The fine map knows nothing of the writes
    /// before: its active interval becomes unknown.
    pub(crate) fn restore(
        &self,
        clean: bool,
        saved: &RecordHeader,
        now: &Now<'_>,
        mut active: KVVec<u8>,
        mut read: KVVec<u8>,
    ) -> core::result::Result<(), Refusal> {
        {
            let mut maps = self.maps.lock();
            let g = maps.geometry;
            let now = Now {
                capacity_sectors: g.capacity_sectors,
                block_shift: g.block_shift,
                block_count: u64::from(g.block_count),
                fresh: fresh(&maps),
                ..*now
            };
            check_restore(clean, saved, &now)?;
            if active.len() != maps.active.len() || read.len() != maps.read.len() {
                return Err(Refusal::Geometry);
            }
            core::mem::swap(&mut maps.active, &mut active);
            core::mem::swap(&mut maps.read, &mut read);
            maps.state = CbtState {
                active: saved.active,
                previous: saved.previous,
                generation: saved.generation,
            };
            let previous = maps.state.previous;
            maps.fine.lose(0, g.capacity_sectors, previous);
        }
        // The fresh maps are freed here, outside the spinlock.
        drop((active, read));
        Ok(())
    }

    /// Returns the geometry and current numbers.
    pub(crate) fn info(&self) -> CbtInfo {
        let maps = self.maps.lock();
        CbtInfo {
            geometry: maps.geometry,
            state: maps.state,
        }
    }

    /// Copies `blocks` of a map to user space. Fails with `ENODATA` if the
    /// map shrank meanwhile.
    pub(crate) fn read_to_user(
        &self,
        which: Map,
        blocks: Range<usize>,
        out: &mut UserSliceWriter,
    ) -> Result {
        let mut bounce = KVec::from_elem(0u8, COPY_CHUNK, GFP_KERNEL)?;
        let mut pos = blocks.start;
        while pos < blocks.end {
            let len = (blocks.end - pos).min(COPY_CHUNK);
            {
                let maps = self.maps.lock();
                let map = match which {
                    Map::Read => &maps.read,
                    Map::Active => &maps.active,
                };
                let part = map.get(pos..pos + len).ok_or(ENODATA)?;
                bounce[..len].copy_from_slice(part);
            }
            out.write_slice(&bounce[..len])?;
            pos += len;
        }
        Ok(())
    }
}
