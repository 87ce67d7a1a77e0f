// SPDX-License-Identifier: GPL-2.0

//! Snapshots: create, add devices, take, destroy.
//!
//! A snapshot groups tracked devices and a difference storage. Taking it
//! captures all its devices at one instant: their file systems are frozen,
//! writes to the devices are held while the change tracking maps switch and
//! copy-on-write starts, then everything is thawed and the snapshot images
//! appear. Destroying it removes the images and the storage; change tracking
//! goes on.

use crate::{
    chunk::{ChunkGeometry, ChunkParams},
    diff_area::DiffArea,
    diff_storage::DiffStorage,
    event_queue::{Event, EventQueue},
    params,
    snapimage::Image,
    tracker::Tracker,
};
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::{
    alloc::{flags::GFP_KERNEL, KBox, KVec},
    block::{bdev::BlockDevice, disk::DiskCount},
    error::code::*,
    new_mutex,
    prelude::*,
    str::CStr,
    sync::{Arc, Mutex},
    time::{ktime_ms_delta, msecs_to_jiffies, Ktime},
    uuid::Uuid,
    workqueue::OwnedQueue,
    ThisModule,
};

/// How long taking a snapshot waits, at most, for the writes in flight on
/// its devices before it gives up with `ETIMEDOUT`.
const DRAIN_TIMEOUT_MS: u32 = 30_000;

/// Module-wide state.
#[pin_data]
pub(crate) struct Globals {
    #[pin]
    snapshots: Mutex<KVec<Arc<Snapshot>>>,
    /// Which image indexes are in use.
    #[pin]
    image_slots: Mutex<KVec<bool>>,
    /// Copy-on-write and image I/O.
    pub(crate) wq: Arc<OwnedQueue>,
    /// The images whose data is not freed yet.
    disks: Pin<KBox<DiskCount>>,
    pub(crate) module: &'static ThisModule,
}

static GLOBALS: AtomicPtr<Globals> = AtomicPtr::new(core::ptr::null_mut());

/// The module-wide state. Valid while the module is loaded: everything that
/// calls this runs with the module pinned (an open control device, an
/// attached filter, an open image) or during init and exit.
pub(crate) fn globals() -> &'static Globals {
    let p = GLOBALS.load(Ordering::Acquire);
    // SAFETY: `init_globals` stores a pointer to a pinned allocation that
    // `exit_globals` frees only after clearing it, when no caller is left.
    unsafe { &*p }
}

impl Globals {
    /// The count of the images whose data is not freed yet.
    pub(crate) fn disks(&self) -> Pin<&DiskCount> {
        self.disks.as_ref()
    }
}

/// Sets up the module-wide state; owned by the returned box.
pub(crate) fn init_globals(module: &'static ThisModule) -> Result<Pin<KBox<Globals>>> {
    let wq = Arc::new(
        OwnedQueue::new(
            kernel::c_str!("blksnap"),
            kernel::workqueue::flags::UNBOUND | kernel::workqueue::flags::MEM_RECLAIM,
            0,
        )?,
        GFP_KERNEL,
    )?;
    let g = KBox::pin_init(
        try_pin_init!(Globals {
            snapshots <- new_mutex!(KVec::new(), "Globals::snapshots"),
            image_slots <- new_mutex!(KVec::new(), "Globals::image_slots"),
            wq,
            disks: KBox::pin_init(DiskCount::new(), GFP_KERNEL)?,
            module,
        }),
        GFP_KERNEL,
    )?;
    GLOBALS.store((&*g as *const Globals).cast_mut(), Ordering::Release);
    Ok(g)
}

/// Tears down the module-wide state: destroys the remaining snapshots and
/// waits for the images that are still open to be freed.
pub(crate) fn exit_globals(g: Pin<KBox<Globals>>) {
    let all = core::mem::take(&mut *g.snapshots.lock());
    for s in all.iter() {
        s.destroy();
    }
    drop(all);
    g.wq.flush();
    g.disks.wait_empty();
    GLOBALS.store(core::ptr::null_mut(), Ordering::Release);
    drop(g);
}

struct Inner {
    trackers: KVec<Arc<Tracker>>,
    images: KVec<Image>,
    taken: bool,
    destroyed: bool,
}

/// A snapshot.
#[pin_data]
pub(crate) struct Snapshot {
    id: Uuid,
    store: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    limit: u64,
    #[pin]
    inner: Mutex<Inner>,
}

impl Snapshot {
    /// `IOCTL_BLKSNAP_SNAPSHOT_CREATE`: creates a snapshot whose difference
    /// storage is at `path`, at most `limit` sectors. Its clients may know
    /// only the upstream interface: it gets only upstream events.
    pub(crate) fn create(path: &CStr, limit: u64) -> Result<Uuid> {
        check_limit(limit)?;
        let events = EventQueue::new(false)?;
        let store = DiffStorage::open(path, limit, events.clone())?;
        let id = Self::register(store, events, limit)?;
        pr_info!("snapshot {} created, storage {}\n", id, path);
        Ok(id)
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE`: a snapshot whose storage is
    /// memory of at most `limit` sectors, or device ranges appended later.
    /// Its clients use our extensions: it gets our extension events too.
    pub(crate) fn create_kind(kind: u32, limit: u64) -> Result<Uuid> {
        let events = EventQueue::new(true)?;
        let (store, what) = match kind {
            crate::uapi::storage::MEMORY => {
                if limit == 0 {
                    pr_err!("a memory storage needs a limit\n");
                    return Err(EINVAL);
                }
                check_limit(limit)?;
                (DiffStorage::memory(limit, events.clone())?, "memory")
            }
            crate::uapi::storage::DEVICES => {
                (DiffStorage::devices(events.clone())?, "device ranges")
            }
            _ => {
                pr_err!("unknown storage kind {}\n", kind);
                return Err(EINVAL);
            }
        };
        let id = Self::register(store, events, limit)?;
        pr_info!("snapshot {} created, storage in {}\n", id, what);
        Ok(id)
    }

    fn register(store: Arc<DiffStorage>, events: Arc<EventQueue>, limit: u64) -> Result<Uuid> {
        let id = Uuid::new_random();
        let s = Arc::pin_init(
            try_pin_init!(Self {
                id,
                store,
                events,
                limit,
                inner <- new_mutex!(Inner {
                    trackers: KVec::new(),
                    images: KVec::new(),
                    taken: false,
                    destroyed: false,
                }, "Snapshot::inner"),
            }),
            GFP_KERNEL,
        )?;
        globals().snapshots.lock().push(s, GFP_KERNEL)?;
        Ok(id)
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE`.
    pub(crate) fn append_storage(&self, path: &CStr, ranges: &[(u64, u64)]) -> Result {
        let inner = self.inner.lock();
        if inner.destroyed {
            return Err(ESRCH);
        }
        // The new ranges must not be on a device of this snapshot.
        let dev = kernel::fs::file::File::open(path, 0, 0)?;
        if let Some(bdev) = dev.bdev() {
            if let Some(t) = inner.trackers.iter().find(|t| overlaps(bdev, t.bdev())) {
                pr_err!(
                    "snapshot {}: storage on {} would be on snapshotted {}\n",
                    self.id,
                    path,
                    t.bdev().name()
                );
                return Err(EINVAL);
            }
        }
        drop(dev);
        self.store.append(path, ranges)
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`: the next event.
    pub(crate) fn wait_event(&self, timeout_ms: u32) -> Result<Event> {
        self.events.wait(timeout_ms)
    }

    /// Finds a snapshot by id.
    pub(crate) fn find(id: &Uuid) -> Result<Arc<Self>> {
        globals()
            .snapshots
            .lock()
            .iter()
            .find(|s| s.id == *id)
            .cloned()
            .ok_or_else(|| {
                pr_err!("no snapshot {}\n", id);
                ESRCH
            })
    }

    /// The ids of all snapshots.
    pub(crate) fn collect() -> Result<KVec<Uuid>> {
        let list = globals().snapshots.lock();
        let mut ids = KVec::with_capacity(list.len(), GFP_KERNEL)?;
        for s in list.iter() {
            ids.push(s.id, GFP_KERNEL)?;
        }
        Ok(ids)
    }

    /// `SNAPSHOTADD`: adds a tracked device.
    pub(crate) fn add(self: &Arc<Self>, tracker: &Arc<Tracker>) -> Result {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return Err(ESRCH);
        }
        if inner.taken {
            pr_err!(
                "snapshot {} is taken already: cannot add {}\n",
                self.id,
                tracker.dev()
            );
            return Err(EBUSY);
        }
        {
            if self.store.is_on(tracker.bdev()) {
                pr_err!(
                    "the difference storage of snapshot {} is on {}: it cannot be snapshotted\n",
                    self.id,
                    tracker.bdev().name()
                );
                return Err(EINVAL);
            }
        }
        tracker.join(self.id)?;
        if let Err(e) = inner.trackers.push(tracker.clone(), GFP_KERNEL) {
            let _ = tracker.leave(&self.id);
            return Err(e.into());
        }
        pr_info!(
            "snapshot {}: added {} [{}]\n",
            self.id,
            tracker.bdev().name(),
            tracker.dev()
        );
        Ok(())
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_TAKE`.
    ///
    /// The cut: the file systems of the devices (and of a disk's
    /// partitions) are frozen; new writes are held on every device; the
    /// writes that passed before are waited for, so that every write that
    /// completed before the cut is in the snapshot and none that was held is;
    /// then the CBT maps switch and copy-on-write starts on every device,
    /// the held writes go on, and the file systems thaw.
    pub(crate) fn take(self: &Arc<Self>) -> Result {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return Err(ESRCH);
        }
        if inner.taken {
            pr_err!("snapshot {} is taken already\n", self.id);
            return Err(EALREADY);
        }
        if inner.trackers.is_empty() {
            pr_err!("snapshot {} has no devices\n", self.id);
            return Err(ENODEV);
        }

        // Everything that can fail and needs memory happens before the
        // devices are frozen.
        let cp = params::chunk_params();
        let n = inner.trackers.len();
        let mut areas = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut resets = KVec::with_capacity(n, GFP_KERNEL)?;
        let mut freeze = KVec::new();
        for t in inner.trackers.iter() {
            if t.is_detached() {
                pr_err!("snapshot {}: device {} is gone\n", self.id, t.dev());
                return Err(ENODEV);
            }
            let bdev = t.bdev();
            let g = chunk_geometry(bdev.nr_sectors(), bdev.logical_block_size(), &cp)?;
            if self.limit != 0 && self.limit < g.chunk_sectors() {
                pr_err!(
                    "snapshot {}: storage limit {} sectors is smaller than a chunk of {} ({} sectors)\n",
                    self.id,
                    self.limit,
                    bdev.name(),
                    g.chunk_sectors()
                );
                return Err(EINVAL);
            }
            let area = DiffArea::new(
                t.clone(),
                g,
                self.store.clone(),
                self.events.clone(),
                globals().wq.clone(),
                params::chunk_maximum_in_queue.get(),
            )?;
            areas.push(area, GFP_KERNEL)?;
            resets.push(Some(t.prepare_switch()?), GFP_KERNEL)?;
            // A disk's partitions may carry file systems of their own.
            freeze.push(t.bdev_ref(), GFP_KERNEL)?;
            for part in bdev.partitions()? {
                freeze.push(part, GFP_KERNEL)?;
            }
        }
        let mut slots = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            match alloc_image_slot() {
                Ok(s) => slots.push(s, GFP_KERNEL)?,
                Err(e) => {
                    for s in slots.iter() {
                        free_image_slot(*s);
                    }
                    return Err(e);
                }
            }
        }

        let start = Ktime::ktime_get();
        let mut frozen = 0;
        for bdev in freeze.iter() {
            if let Err(e) = bdev.freeze() {
                // Like upstream: the snapshot is still crash consistent.
                pr_warn!(
                    "snapshot {}: cannot freeze {}: {:?}\n",
                    self.id,
                    bdev.name(),
                    e
                );
                break;
            }
            frozen += 1;
        }
        for t in inner.trackers.iter() {
            t.hold_writes();
        }
        let held = Ktime::ktime_get();
        let drained = self.drain(&inner.trackers);
        let drain_ms = ktime_ms_delta(Ktime::ktime_get(), held);
        let mut switched = Ok(());
        if drained.is_ok() {
            for ((t, a), r) in inner
                .trackers
                .iter()
                .zip(areas.iter())
                .zip(resets.iter_mut())
            {
                if let Err(e) = t.switch_to(a, r.take().flatten()) {
                    switched = Err(e);
                }
            }
        }
        for t in inner.trackers.iter() {
            t.release_writes();
        }
        let held_ms = ktime_ms_delta(Ktime::ktime_get(), held);
        for bdev in freeze.iter().take(frozen).rev() {
            if let Err(e) = bdev.thaw() {
                pr_err!("snapshot {}: thawing {}: {:?}\n", self.id, bdev.name(), e);
            }
        }
        let window_ms = ktime_ms_delta(Ktime::ktime_get(), start);
        if let Err(e) = drained {
            // Nothing switched: the snapshot stays untaken and may be taken
            // again.
            for s in slots.iter() {
                free_image_slot(*s);
            }
            return Err(e);
        }
        if let Err(e) = switched {
            // A device went away during the take. The snapshot cannot be
            // used: it stays taken without images until it is destroyed.
            pr_err!(
                "snapshot {}: a device went away while it was taken: {:?}\n",
                self.id,
                e
            );
            for s in slots.iter() {
                free_image_slot(*s);
            }
            inner.taken = true;
            for t in inner.trackers.iter() {
                let _ = t.leave(&self.id);
            }
            return Err(e);
        }
        pr_info!(
            "snapshot {} taken: {} devices frozen for {} ms, writes held for {} ms ({} ms waiting for writes in flight)\n",
            self.id,
            n,
            window_ms,
            held_ms,
            drain_ms
        );

        // The images appear after the thaw: creating them may take time.
        let mut images = KVec::with_capacity(n, GFP_KERNEL)?;
        for ((t, a), slot) in inner.trackers.iter().zip(areas.iter()).zip(slots.iter()) {
            match Image::new(*slot, t.bdev(), a.clone()) {
                Ok(img) => {
                    t.set_image(*slot);
                    pr_info!(
                        "snapshot {}: {} is the image of {}\n",
                        self.id,
                        img.name(),
                        t.bdev().name()
                    );
                    // Cannot fail: the capacity is there.
                    let _ = images.push(img, GFP_KERNEL);
                }
                Err(e) => {
                    pr_err!(
                        "snapshot {}: cannot create the image of {}: {:?}\n",
                        self.id,
                        t.bdev().name(),
                        e
                    );
                    a.set_error(e);
                    free_image_slot(*slot);
                }
            }
        }
        inner.images = images;
        inner.taken = true;
        Ok(())
    }

    /// Waits until no write that passed before the hold is in flight on
    /// any of `trackers`, for at most [`DRAIN_TIMEOUT_MS`] in all.
    fn drain(&self, trackers: &[Arc<Tracker>]) -> Result {
        let start = Ktime::ktime_get();
        for t in trackers {
            let spent =
                u32::try_from(ktime_ms_delta(Ktime::ktime_get(), start)).unwrap_or(u32::MAX);
            let left = DRAIN_TIMEOUT_MS.saturating_sub(spent).max(1);
            if let Err(e) = t.drain(msecs_to_jiffies(left)) {
                pr_err!(
                    "snapshot {} not taken: waiting for the writes in flight on {}: {:?}\n",
                    self.id,
                    t.bdev().name(),
                    e
                );
                return Err(e);
            }
        }
        Ok(())
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_DESTROY`: removes the snapshot from the list
    /// and releases everything.
    pub(crate) fn remove(id: &Uuid) -> Result {
        let s = {
            let mut list = globals().snapshots.lock();
            let pos = list.iter().position(|s| s.id == *id).ok_or_else(|| {
                pr_err!("no snapshot {}\n", id);
                ESRCH
            })?;
            list.remove(pos).ok_or(ESRCH)?
        };
        s.destroy();
        Ok(())
    }

    /// Removes the images, stops copy-on-write and lets the devices go.
    fn destroy(&self) {
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return;
        }
        inner.destroyed = true;
        self.events.close();
        // No new image I/O first; reads in flight finish on their own.
        for img in core::mem::take(&mut inner.images) {
            if img.openers() != 0 {
                pr_warn!(
                    "snapshot {}: {} is still open; it is removed anyway\n",
                    self.id,
                    img.name()
                );
            }
            free_image_slot(img.index());
            drop(img);
        }
        for t in core::mem::take(&mut inner.trackers) {
            if let Some(a) = t.leave(&self.id) {
                pr_info!(
                    "snapshot {}: {} chunks of {} were copied\n",
                    self.id,
                    a.stored_chunks(),
                    t.bdev().name()
                );
            }
        }
        let (used, available) = self.store.usage();
        pr_info!(
            "snapshot {} destroyed; its storage held {} of {} MiB\n",
            self.id,
            used >> 11,
            available >> 11
        );
    }
}

/// True if storage on `a` would write to `b`: the same device, a disk and
/// one of its partitions, or `a` stacked over `b` (device-mapper, md).
fn overlaps(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.dev() == b.dev()
        || a.whole().dev() == b.dev()
        || b.whole().dev() == a.dev()
        || a.is_stacked_on(b)
}

/// Checks that a storage limit can hold at least one chunk.
fn check_limit(limit: u64) -> Result {
    let min = 1u64 << (params::chunk_params().minimum_shift.max(9) - 9);
    if limit != 0 && limit < min {
        pr_err!(
            "difference storage limit {} is smaller than a chunk ({} sectors)\n",
            limit,
            min
        );
        return Err(EINVAL);
    }
    Ok(())
}

/// The chunk geometry of a device.
fn chunk_geometry(sectors: u64, block_size: u32, cp: &ChunkParams) -> Result<ChunkGeometry> {
    ChunkGeometry::new(sectors, block_size, cp).map_err(|e| {
        pr_err!(
            "no chunk size for {} sectors with {:?}: {:?}\n",
            sectors,
            cp,
            e
        );
        EINVAL
    })
}

fn alloc_image_slot() -> Result<u32> {
    let mut slots = globals().image_slots.lock();
    if let Some(i) = slots.iter().position(|used| !used) {
        slots[i] = true;
        return Ok(i as u32);
    }
    slots.push(true, GFP_KERNEL)?;
    Ok(slots.len() as u32 - 1)
}

fn free_image_slot(i: u32) {
    if let Some(s) = globals().image_slots.lock().get_mut(i as usize) {
        *s = false;
    }
}
