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
    persist::Persist,
    snapimage::{Image, ImageSlots},
    store::{stack_levels, storage_cycle},
    tracker::Tracker,
};
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::{
    alloc::{flags::GFP_KERNEL, KBox, KVec},
    block::{bdev::BlockDevice, bio::BioSet, disk::DiskCount},
    error::code::*,
    new_mutex,
    prelude::*,
    str::CStr,
    sync::{Arc, ArcBorrow, Mutex},
    time::{ktime_ms_delta, msecs_to_jiffies, Ktime},
    types::ARef,
    uuid::Uuid,
    workqueue::{flags as wq_flags, OwnedQueue},
    ThisModule,
};

/// How long taking a snapshot waits, at most, for the writes in flight on
/// its devices before it gives up with `ETIMEDOUT`.
const DRAIN_TIMEOUT_MS: u32 = 30_000;

/// Bios in reserve for the clones of image reads: what keeps them going
/// when memory is short.
const BIO_POOL: u32 = 64;

/// Module-wide state, owned by the module (`BlkSnap`) through an [`Arc`].
///
/// The objects that outlive a call into the module hold what they need of it
/// themselves, as `Arc`s: an image its difference area (and through it the
/// queues) and its number's [`ImageSlots`], a snapshot its copy queue. Module
/// exit therefore waits for those objects, not for references to this.
#[pin_data]
pub(crate) struct Globals {
    #[pin]
    snapshots: Mutex<KVec<Arc<Snapshot>>>,
    /// Held while a device joins a snapshot or storage is appended: the
    /// storage cycle check and the change it allows are one step.
    #[pin]
    topology: Mutex<()>,
    /// The image numbers in use.
    slots: Arc<ImageSlots>,
    /// Image reads and writes of every snapshot.
    image_wq: Arc<OwnedQueue>,
    /// The clones that image reads send to devices.
    bios: Arc<BioSet>,
    /// The watchdogs of the difference areas ([`DiffArea::start_watch`]).
    watch_wq: OwnedQueue,
    /// The images whose data is not freed yet.
    disks: Pin<KBox<DiskCount>>,
    module: &'static ThisModule,
    /// The CBT state device.
    #[pin]
    persist: Persist,
}

/// Where the module's [`Globals`] are, for the entry points that have no
/// other way to them (the control device's ioctls and the filter's
/// commands). Null outside `init_globals`..`exit_globals`.
static GLOBALS: AtomicPtr<Globals> = AtomicPtr::new(core::ptr::null_mut());

/// The module-wide state, as a new reference.
///
/// Called only by entry points that run with the module pinned (an open
/// control device, an attached filter), which module exit cannot overlap.
/// What they keep beyond the call they keep through `Arc`s of their own.
pub(crate) fn globals() -> Result<Arc<Globals>> {
    let p = GLOBALS.load(Ordering::Acquire);
    if p.is_null() {
        return Err(ENODEV);
    }
    // `p` is the address of the value of the `Arc<Globals>` that the module
    // owns (what `Arc::into_raw` would return for it, see `init_globals`).
    // That `Arc` is dropped only by `exit_globals`, after it cleared
    // `GLOBALS`; module exit runs only once no entry point holds the module,
    // and the callers of this function all run inside one, so none can still
    // be between the load above and the increment of the count below when
    // the `Arc` is dropped.
    // SAFETY: `p` comes from the live `Arc<Globals>` (see above), so it may
    // be borrowed as an `ArcBorrow`; the borrow ends within this call.
    let g = unsafe { ArcBorrow::<Globals>::from_raw(p) };
    Ok(g.into())
}

/// Drops `value` in a work item of the module's image queue rather than in
/// the caller's context (which may hold locks its drop must not take).
/// Without memory for the work item, or while the module goes away, it is
/// dropped here after all, with a log line.
pub(crate) fn drop_later<T: Send + 'static>(flags: kernel::alloc::Flags, value: T) {
    let Ok(g) = globals() else {
        return;
    };
    if g.image_wq.try_spawn(flags, move || drop(value)).is_err() {
        pr_err!("out of memory: a deferred release runs in place\n");
    }
}

impl Globals {
    /// The CBT state device.
    pub(crate) fn persist(&self) -> &Persist {
        &self.persist
    }
}

/// `IOCTL_BLKSNAP_CBT_SAVE`.
pub(crate) fn save_cbt() -> Result<(u32, u64)> {
    let g = globals()?;
    g.persist.save(&g.watch_wq)
}

/// A write met a sealed device (see [`crate::persist`]): the seal breaks
/// in a work item of the watchdog queue, which has a rescuer. Never sleeps.
pub(crate) fn break_seal() {
    if let Ok(g) = globals() {
        g.persist.break_seal(&g.watch_wq);
    }
}

/// Sets up the module-wide state, owned by the returned `Arc`.
pub(crate) fn init_globals(module: &'static ThisModule) -> Result<Arc<Globals>> {
    // Image I/O may be what memory reclaim waits for (a file system on an
    // image): it needs a rescuer.
    let image_wq = Arc::new(
        OwnedQueue::new(
            kernel::c_str!("blksnap-image"),
            wq_flags::UNBOUND | wq_flags::MEM_RECLAIM,
            0,
        )?,
        GFP_KERNEL,
    )?;
    // A watchdog must run when memory is short: that is when a store
    // gets stuck.
    let watch_wq = OwnedQueue::new(
        kernel::c_str!("blksnap-watch"),
        wq_flags::UNBOUND | wq_flags::MEM_RECLAIM,
        0,
    )?;
    let g = Arc::pin_init(
        try_pin_init!(Globals {
            snapshots <- new_mutex!(KVec::new(), "Globals::snapshots"),
            topology <- new_mutex!((), "Globals::topology"),
            slots: ImageSlots::new()?,
            image_wq,
            bios: Arc::pin_init(BioSet::new(BIO_POOL), GFP_KERNEL)?,
            watch_wq,
            disks: KBox::pin_init(DiskCount::new(), GFP_KERNEL)?,
            module,
            persist <- Persist::new(),
        }),
        GFP_KERNEL,
    )?;
    GLOBALS.store((&*g as *const Globals).cast_mut(), Ordering::Release);
    Ok(g)
}

/// Tears down the module-wide state: destroys the remaining snapshots and
/// waits for the images that are still open to be freed. Runs when nothing
/// holds the module any more, so no entry point can call [`globals`].
pub(crate) fn exit_globals(g: Arc<Globals>) {
    GLOBALS.store(core::ptr::null_mut(), Ordering::Release);
    let all = core::mem::take(&mut *g.snapshots.lock());
    for s in all.iter() {
        // Waits for the snapshot's copies.
        s.destroy();
    }
    drop(all);
    // Image I/O can be queued until the last image's data is freed; then
    // no more. Once the queue is flushed after that, no work item holds a
    // difference area (or any queue) any more, and dropping `g` destroys
    // the image queue here, not in one of its own work items.
    g.disks.wait_empty();
    // The watchdogs ended with the destroys.
    g.watch_wq.flush();
    g.image_wq.flush();
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
    /// The copies of this snapshot's chunks, and only those: a copy may wait
    /// for a copy of another snapshot (whose device holds this one's
    /// storage), which then runs on that snapshot's queue. Destroy waits for
    /// the last copy, so the queue is never dropped by one of its own work
    /// items. Reclaim may write to a snapshotted device and wait for a copy:
    /// it has a rescuer.
    copy_wq: Arc<OwnedQueue>,
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
        let g = globals()?;
        let id = Uuid::new_random();
        let copy_wq = Arc::new(
            OwnedQueue::new(
                kernel::c_str!("blksnap-copy"),
                wq_flags::UNBOUND | wq_flags::MEM_RECLAIM,
                0,
            )?,
            GFP_KERNEL,
        )?;
        let s = Arc::pin_init(
            try_pin_init!(Self {
                id,
                store,
                events,
                limit,
                copy_wq,
                inner <- new_mutex!(Inner {
                    trackers: KVec::new(),
                    images: KVec::new(),
                    taken: false,
                    destroyed: false,
                }, "Snapshot::inner"),
            }),
            GFP_KERNEL,
        )?;
        g.snapshots.lock().push(s, GFP_KERNEL)?;
        Ok(id)
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE`.
    pub(crate) fn append_storage(&self, path: &CStr, ranges: &[(u64, u64)]) -> Result {
        let g = globals()?;
        let _topology = g.topology.lock();
        if self.inner.lock().destroyed {
            return Err(ESRCH);
        }
        let dev = kernel::fs::file::File::open(path, 0, 0)?;
        if let Some(bdev) = dev.bdev() {
            // The new ranges must not be on a device of this snapshot, nor
            // of one whose storage leads back to this one.
            self.check_storage_cycle(&g, Change::Store(bdev))?;
        }
        drop(dev);
        self.store.append(path, ranges)
    }

    /// Refuses `change` to this snapshot with `EINVAL` if the storages would
    /// then form a cycle: the storage of a snapshot on a device of a second
    /// one, whose storage is on a device of a third one... whose storage is
    /// on a device of the first (or of itself). Each copy of a chunk there
    /// writes to a chunk of the next snapshot that nobody wrote to before,
    /// which must be copied in turn, for ever, and copies of the snapshots
    /// would wait for one another.
    ///
    /// The caller holds `Globals::topology` until the change is made.
    fn check_storage_cycle(&self, g: &Globals, change: Change<'_>) -> Result {
        // The snapshots with devices: only those can be on a cycle, and
        // there are at most as many as tracked devices.
        let all = {
            let list = g.snapshots.lock();
            let mut all = KVec::with_capacity(list.len(), GFP_KERNEL)?;
            for s in list.iter() {
                all.push(s.clone(), GFP_KERNEL)?;
            }
            all
        };
        let mut nodes: KVec<(Arc<Snapshot>, KVec<ARef<BlockDevice>>)> = KVec::new();
        let mut this = None;
        for s in all.iter() {
            let devs = s.devices()?;
            let me = core::ptr::eq(&**s, self);
            if devs.is_empty() && !(me && matches!(change, Change::Device(_))) {
                continue;
            }
            if me {
                this = Some(nodes.len());
            }
            nodes.push((s.clone(), devs), GFP_KERNEL)?;
        }
        let Some(this) = this else {
            // This snapshot has no device and gets none: no edge leads to
            // it, so it is on no cycle.
            return Ok(());
        };
        let n = nodes.len();
        // The edges, computed once: "the storage of i is on a device of j".
        let mut edges = KVec::from_elem(false, n * n, GFP_KERNEL)?;
        for i in 0..n {
            for j in 0..n {
                let (si, _) = &nodes[i];
                let (_, dj) = &nodes[j];
                let mut on = dj.iter().any(|d| si.store.is_on(d));
                match change {
                    Change::Device(bdev) if j == this => on |= si.store.is_on(bdev),
                    Change::Store(bdev) if i == this => on |= dj.iter().any(|d| overlaps(bdev, d)),
                    _ => {}
                }
                edges[i * n + j] = on;
            }
        }
        let mut color = KVec::from_elem(0u8, n, GFP_KERNEL)?;
        let mut stack = KVec::from_elem((0usize, 0usize), n, GFP_KERNEL)?;
        let Some(v) = storage_cycle(n, |i, j| edges[i * n + j], &mut color, &mut stack) else {
            return Ok(());
        };
        let what = match change {
            Change::Device(bdev) => ("adding", bdev),
            Change::Store(bdev) => ("storage on", bdev),
        };
        if edges[this * n + this] {
            pr_err!(
                "snapshot {}: {} {} would put its storage on its own devices (a storage cycle)\n",
                self.id,
                what.0,
                what.1.name()
            );
        } else {
            pr_err!(
                "snapshot {}: {} {} would close a storage cycle through snapshot {}: the storage of each is on a device of the next\n",
                self.id,
                what.0,
                what.1.name(),
                nodes[v].0.id
            );
        }
        Err(EINVAL)
    }

    /// The devices of the snapshot, while it is not destroyed.
    fn devices(&self) -> Result<KVec<ARef<BlockDevice>>> {
        let inner = self.inner.lock();
        let mut devs = KVec::with_capacity(inner.trackers.len(), GFP_KERNEL)?;
        for t in inner.trackers.iter() {
            devs.push(t.bdev_ref(), GFP_KERNEL)?;
        }
        Ok(devs)
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`: the next event.
    pub(crate) fn wait_event(&self, timeout_ms: u32) -> Result<Event> {
        self.events.wait(timeout_ms)
    }

    /// Finds a snapshot by id.
    pub(crate) fn find(id: &Uuid) -> Result<Arc<Self>> {
        globals()?
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
        let g = globals()?;
        let list = g.snapshots.lock();
        let mut ids = KVec::with_capacity(list.len(), GFP_KERNEL)?;
        for s in list.iter() {
            ids.push(s.id, GFP_KERNEL)?;
        }
        Ok(ids)
    }

    /// `SNAPSHOTADD`: adds a tracked device.
    pub(crate) fn add(self: &Arc<Self>, tracker: &Arc<Tracker>) -> Result {
        let g = globals()?;
        let _topology = g.topology.lock();
        {
            let inner = self.inner.lock();
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
        }
        if self.store.is_on(tracker.bdev()) {
            pr_err!(
                "the difference storage of snapshot {} is on {}: it cannot be snapshotted\n",
                self.id,
                tracker.bdev().name()
            );
            return Err(EINVAL);
        }
        // A snapshot whose storage is on this device must not have its
        // storage on a device that leads back here.
        self.check_storage_cycle(&g, Change::Device(tracker.bdev()))?;
        // Nothing changed the snapshot meanwhile but a destroy or a take.
        let mut inner = self.inner.lock();
        if inner.destroyed {
            return Err(ESRCH);
        }
        if inner.taken {
            return Err(EBUSY);
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
    /// partitions) are frozen; new writes are held on every device and the
    /// writes that passed before are waited for, from the top of a storage
    /// stack down (an LV before its PV: see `hold_and_drain`), so that
    /// every write that completed before the cut is in the snapshot and
    /// none that was held is; then the CBT maps switch and copy-on-write starts on every device,
    /// the held writes go on, and the file systems thaw.
    ///
    /// Everything that can fail is done before the switch, except creating
    /// the images. A take that fails after the switch leaves the snapshot
    /// taken but unusable ([`Self::abandon`]); the writes held during the
    /// take go on to the device in every case.
    pub(crate) fn take(self: &Arc<Self>) -> Result {
        let glob = globals()?;
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
                self.copy_wq.clone(),
                glob.image_wq.clone(),
                glob.bios.clone(),
            )?;
            areas.push(area, GFP_KERNEL)?;
            resets.push(Some(t.prepare_switch()?), GFP_KERNEL)?;
            // A disk's partitions may carry file systems of their own.
            freeze.push(t.bdev_ref(), GFP_KERNEL)?;
            for part in bdev.partitions()? {
                freeze.push(part, GFP_KERNEL)?;
            }
        }
        // Which devices are stacked on which (holder links, sleeping on
        // their mutex: before the freeze): the writes are held from the
        // top of each stack down (see `hold_and_drain`).
        let mut levels = KVec::from_elem(0usize, n, GFP_KERNEL)?;
        stack_levels(
            n,
            |i, j| {
                inner.trackers[i]
                    .bdev()
                    .is_stacked_on(inner.trackers[j].bdev())
            },
            &mut levels,
        );
        // Image numbers: each is free again when its `Slot` is dropped,
        // whichever way this returns.
        let mut slots = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            slots.push(glob.slots.alloc()?, GFP_KERNEL)?;
        }
        let mut images = KVec::with_capacity(n, GFP_KERNEL)?;

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
        let held = Ktime::ktime_get();
        let drained = self.hold_and_drain(&inner.trackers, &levels);
        let drain_us = us_delta(Ktime::ktime_get(), held);
        let mut switched = Ok(());
        if drained.is_ok() {
            for ((t, a), r) in inner
                .trackers
                .iter()
                .zip(areas.iter())
                .zip(resets.iter_mut())
            {
                let Some(prepared) = r.take() else {
                    continue;
                };
                if let Err(e) = t.switch_to(a, prepared) {
                    switched = Err(e);
                }
            }
        }
        for t in inner.trackers.iter() {
            t.release_writes();
        }
        let held_us = us_delta(Ktime::ktime_get(), held);
        for bdev in freeze.iter().take(frozen).rev() {
            if let Err(e) = bdev.thaw() {
                pr_err!("snapshot {}: thawing {}: {:?}\n", self.id, bdev.name(), e);
            }
        }
        let window_us = us_delta(Ktime::ktime_get(), start);
        // If the writes in flight did not drain, nothing switched: the
        // snapshot stays untaken and may be taken again.
        drained?;
        if let Err(e) = switched {
            pr_err!(
                "snapshot {}: a device went away while it was taken: {:?}\n",
                self.id,
                e
            );
            self.abandon(&mut inner);
            return Err(e);
        }
        for a in areas.iter() {
            if let Err(e) = a.start_watch(&glob.watch_wq) {
                pr_warn!(
                    "snapshot {}: no watchdog for a device ({:?}): a stuck storage holds its writes\n",
                    self.id,
                    e
                );
            }
        }
        pr_info!(
            "snapshot {} taken: {} devices frozen for {}.{:03} ms, writes held for {}.{:03} ms ({}.{:03} ms waiting for writes in flight)\n",
            self.id,
            n,
            window_us / 1000,
            window_us % 1000,
            held_us / 1000,
            held_us % 1000,
            drain_us / 1000,
            drain_us % 1000
        );

        // The images appear after the thaw: creating them may take time.
        let mut failed = None;
        for ((t, a), slot) in inner.trackers.iter().zip(areas.iter()).zip(slots) {
            match Image::new(slot, t.bdev(), a.clone(), glob.module, glob.disks.as_ref()) {
                Ok(img) => {
                    t.set_image(img.index());
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
                    failed = Some(e);
                    break;
                }
            }
        }
        inner.images = images;
        if let Some(e) = failed {
            self.abandon(&mut inner);
            return Err(e);
        }
        inner.taken = true;
        Ok(())
    }

    /// Gives up a snapshot whose take failed after the switch: it cannot be
    /// used, and stays taken without images until it is destroyed (a second
    /// take fails with `EALREADY`). Its images go, copy-on-write stops and
    /// every write it holds goes on to the device; the devices are free to
    /// join another snapshot.
    fn abandon(&self, inner: &mut Inner) {
        inner.taken = true;
        // The numbers are free once the images' data is.
        drop(core::mem::take(&mut inner.images));
        for t in inner.trackers.iter() {
            if let Some(a) = t.leave(&self.id) {
                a.wait_copies();
            }
        }
    }

    /// Holds the new writes of `trackers` and waits until no write that
    /// passed before the hold is in flight, for at most
    /// [`DRAIN_TIMEOUT_MS`] in all; a stack level at a time (`levels`, see
    /// [`stack_levels`]): the devices with nothing of the snapshot stacked
    /// on them first, then those under them... A write in flight on a
    /// device-mapper or md device goes on as writes to the devices under it
    /// (from a worker, for dm-crypt or md): those must not be held until it
    /// ended, or it would never end. The devices under a drained level
    /// receive nothing from it any more: its new writes are held.
    ///
    /// On an error, the levels below are not held (their release is then
    /// harmless).
    fn hold_and_drain(&self, trackers: &[Arc<Tracker>], levels: &[usize]) -> Result {
        let start = Ktime::ktime_get();
        let top = levels.iter().copied().max().unwrap_or(0);
        for level in 0..=top {
            let at = || {
                trackers
                    .iter()
                    .zip(levels)
                    .filter(move |(_, l)| **l == level)
                    .map(|(t, _)| t)
            };
            for t in at() {
                t.hold_writes();
            }
            // A device whose CBT state was saved is sealed: the take
            // changes its numbers, so the saved state is marked broken
            // first. No save can seal it again while its writes are held.
            for t in at() {
                if t.cbt().is_sealed() {
                    t.unseal_now();
                }
            }
            for t in at() {
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
        }
        Ok(())
    }

    /// `IOCTL_BLKSNAP_SNAPSHOT_DESTROY`: removes the snapshot from the list
    /// and releases everything.
    pub(crate) fn remove(id: &Uuid) -> Result {
        let s = {
            let g = globals()?;
            let mut list = g.snapshots.lock();
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
        // No new image I/O first; reads in flight finish on their own. An
        // image's number stays in use until its data is freed, after the
        // disk is deleted here and its last opener closed it.
        for img in core::mem::take(&mut inner.images) {
            if img.openers() != 0 {
                pr_warn!(
                    "snapshot {}: {} is still open; it is removed anyway\n",
                    self.id,
                    img.name()
                );
            }
            drop(img);
        }
        for t in core::mem::take(&mut inner.trackers) {
            if let Some(a) = t.leave(&self.id) {
                // Shut down: no copy starts any more. Those queued or
                // running end soon (a copy only waits for I/O).
                a.wait_copies();
                pr_info!(
                    "snapshot {}: {} chunks of {} were copied\n",
                    self.id,
                    a.stored_chunks(),
                    t.bdev().name()
                );
            }
        }
        // Nothing is queued now; the last work items may still be ending.
        self.copy_wq.flush();
        let (used, available) = self.store.usage();
        // The storage's space and devices are free when destroy returns,
        // not when the last image opener or work item lets go of it: an
        // agent may create the next snapshot on the same file system or
        // device right away.
        self.store.release();
        pr_info!(
            "snapshot {} destroyed; its storage held {} of {} MiB\n",
            self.id,
            used >> 11,
            available >> 11
        );
    }
}

/// A change to a snapshot that may close a storage cycle.
#[derive(Clone, Copy)]
enum Change<'a> {
    /// A device joins the snapshot.
    Device(&'a BlockDevice),
    /// Storage on this device is appended to the snapshot's.
    Store(&'a BlockDevice),
}

/// True if storage on `a` would write to `b`: the same device, a disk and
/// one of its partitions, or `a` stacked over `b` (device-mapper, md).
/// Microseconds from `earlier` to `later`.
fn us_delta(later: Ktime, earlier: Ktime) -> i64 {
    (later - earlier).to_ns() / 1000
}

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
