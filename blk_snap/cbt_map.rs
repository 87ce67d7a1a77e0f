// SPDX-License-Identifier: GPL-2.0

//! The change block tracking map of a tracked device.
//!
//! The arithmetic lives in [`crate::cbt`], which the host tests cover; this
//! file owns the two byte maps and the lock that the submit path takes.

use crate::cbt::{CbtError, CbtGeometry, CbtParams, CbtState};
use core::ops::Range;
use kernel::{
    alloc::{flags::GFP_KERNEL, KVVec, KVec},
    error::code::*,
    new_spinlock,
    prelude::*,
    sync::SpinLock,
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
    state: CbtState,
    active: KVVec<u8>,
    read: KVVec<u8>,
}

/// The CBT map of one device.
#[pin_data]
pub(crate) struct CbtMap {
    geometry: CbtGeometry,
    #[pin]
    maps: SpinLock<Maps>,
}

/// A consistent copy of the map's metadata.
pub(crate) struct CbtInfo {
    pub(crate) geometry: CbtGeometry,
    pub(crate) state: CbtState,
}

/// Bytes copied to user space per lock hold when reading a map.
const COPY_CHUNK: usize = 16 * 1024;

impl CbtMap {
    /// Creates the map of a device of `capacity_sectors` sectors.
    pub(crate) fn new(
        capacity_sectors: u64,
        params: &CbtParams,
    ) -> Result<impl PinInit<Self, Error>> {
        let geometry = CbtGeometry::new(capacity_sectors, params).map_err(|e| {
            pr_err!(
                "cannot track {} sectors with {:?}: {:?}\n",
                capacity_sectors,
                params,
                e
            );
            EINVAL
        })?;
        let n = geometry.block_count as usize;
        let active = KVVec::from_elem(0u8, n, GFP_KERNEL)?;
        let read = KVVec::from_elem(0u8, n, GFP_KERNEL)?;
        let state = CbtState::new(*Uuid::new_random().as_bytes());
        Ok(try_pin_init!(Self {
            geometry,
            maps <- new_spinlock!(Maps { state, active, read }, "CbtMap::maps"),
        }))
    }

    /// The geometry, fixed at creation.
    pub(crate) fn geometry(&self) -> &CbtGeometry {
        &self.geometry
    }

    /// Records a write of `count` sectors at `sector`. Called from the submit
    /// path: takes a spinlock, never sleeps.
    pub(crate) fn mark_write(&self, sector: u64, count: u64) {
        let blocks = self.geometry.blocks_touched(sector, count);
        if blocks.is_empty() {
            return;
        }
        let mut maps = self.maps.lock();
        let Maps { state, active, .. } = &mut *maps;
        state.mark_write(active, blocks);
    }

    /// Checks a user-supplied sector range and returns its blocks.
    pub(crate) fn check_range(&self, sector: u64, count: u64) -> Result<Range<usize>, CbtError> {
        self.geometry.check_range(sector, count)
    }

    /// Marks block ranges dirty in both maps.
    pub(crate) fn mark_dirty(&self, ranges: &KVec<Range<usize>>) {
        let mut maps = self.maps.lock();
        let Maps {
            state,
            active,
            read,
        } = &mut *maps;
        for blocks in ranges.iter() {
            state.mark_dirty(active, read, blocks.clone());
        }
    }

    /// Takes a snapshot: the read map becomes a copy of the active map and
    /// the numbers advance, or a new generation starts.
    pub(crate) fn take_snapshot(&self) {
        let mut maps = self.maps.lock();
        let Maps {
            state,
            active,
            read,
        } = &mut *maps;
        if state.take_snapshot(active, read, || *Uuid::new_random().as_bytes()) {
            pr_info!("change numbers exhausted: new CBT generation\n");
        }
    }

    /// Returns the geometry and current numbers.
    pub(crate) fn info(&self) -> CbtInfo {
        CbtInfo {
            geometry: self.geometry,
            state: self.maps.lock().state,
        }
    }

    /// Copies `blocks` of a map to user space.
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
                bounce[..len].copy_from_slice(&map[pos..pos + len]);
            }
            out.write_slice(&bounce[..len])?;
            pos += len;
        }
        Ok(())
    }
}
