// SPDX-License-Identifier: GPL-2.0

//! The difference area: copy-on-write state of one device of a taken
//! snapshot.
//!
//! The device is cut into chunks ([`crate::chunk`]). The first write to a
//! chunk after the snapshot was taken is held until the chunk's original
//! content has been read from the device and stored in the difference
//! storage; later writes to stored chunks pass at once. The write is held
//! only until the old data is in memory: it is stored while the write goes
//! on, and image reads of the chunk wait for that.
//!
//! Each chunk's content (still on the device, being copied, stored at an
//! address, lost) is a `u64` of a dense array allocated at take:
//! [`ChunkGeometry::state_bytes`], 32 MiB per TiB of device with 256 KiB
//! chunks. The few chunks being read from the device or written through
//! the image have an entry in a tree besides.
//!
//! Reading the snapshot image takes stored chunks from the storage and the
//! others from the device itself. Such a read registers as a reader of its
//! chunk, and writes to the chunk are held until it finished, so that the
//! device cannot change under it.
//!
//! Writes to the image go to the storage: a chunk is copied there first if
//! it was not yet. An image write whose chunk is being copied, or written by
//! another image write, is parked on the chunk and queued again when the
//! chunk is ready; no worker sleeps waiting for another work item.
//!
//! Nothing here sleeps in the submit path. Two kinds of work items do the
//! rest, on two kinds of queues:
//!
//! - chunk copies, on the snapshot's own copy queue. A copy waits only for
//!   I/O: a read of the device (which no filter holds) and a write to the
//!   storage, which a snapshot of the storage's device may hold until *its*
//!   copy is done, on *its* own queue. Snapshots whose storages form a cycle
//!   are refused ([`crate::snapshot`]), so such waits always end at a device
//!   of no snapshot, and copies of one snapshot never wait behind copies
//!   that wait for them.
//! - image reads and writes, on the module's image queue. They wait only for
//!   I/O and for nothing the image queue runs.

use crate::{
    chunk::{ChunkGeometry, Content},
    diff_storage::{Device, DiffStorage, NoRoom},
    event_queue::EventQueue,
    io, params,
    tracker::Tracker,
    uapi,
};
use core::ops::Range;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use kernel::{
    alloc::{flags::GFP_KERNEL, flags::GFP_NOIO, KBox, KVVec, KVec},
    block::{
        bdev::BlockDevice,
        bio::{BioList, BioSet, InFlightBio},
        filter::Admitted,
    },
    error::code::*,
    new_condvar, new_spinlock,
    page::Page,
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
    sync::{Arc, CondVar, SpinLock},
    task::NoIoScope,
    time::msecs_to_jiffies,
    types::ARef,
    workqueue::{new_work, OwnedQueue, Queue, SpawnLater, Work, WorkItem},
};

/// A chunk being read from the device or written through the image, or
/// with image writes parked on it.
struct Active {
    /// Image reads of this chunk from the device in progress.
    readers: u32,
    /// An image write is changing the chunk in the storage.
    image_busy: bool,
    /// Image writes waiting for the chunk: queued again when its copy ends
    /// or the image write that changes it is done.
    parked: BioList,
}

impl Active {
    fn new() -> Self {
        Self {
            readers: 0,
            image_busy: false,
            parked: BioList::new(),
        }
    }

    fn idle(&self) -> bool {
        self.readers == 0 && !self.image_busy && self.parked.is_empty()
    }
}

/// A write held until all the chunks it touches are writable.
struct HeldWrite {
    bio: Admitted,
    chunks: Range<u64>,
}

struct State {
    /// The content of every chunk, [`Content::pack`]ed.
    contents: KVVec<u64>,
    /// The chunks that are [`Active`].
    active: RBTree<u64, Active>,
    held: RBTree<u64, HeldWrite>,
    next_held: u64,
    /// Chunk copies queued or running.
    copies: u32,
    /// Chunk copies finished: the progress [`DiffArea::watch`] looks for.
    finished: u64,
    /// Image writes parked on chunks.
    parked: u32,
    /// Writers waiting in [`DiffArea::throttle`].
    throttled: u32,
    /// Set when the snapshot goes away: nothing is held any more.
    shut_down: bool,
    /// The snapshot's chunk copies; let go of once the last copy ended (see
    /// [`DiffArea::wait_copies`]).
    copy_wq: Option<Arc<OwnedQueue>>,
}

impl State {
    /// Where chunk `c`'s content is.
    fn content(&self, c: u64) -> Content {
        content(&self.contents, c)
    }

    /// Records where chunk `c`'s content is. An address too large to
    /// record makes the chunk lost.
    fn set_content(&mut self, c: u64, content: Content) {
        let packed = content
            .pack()
            .unwrap_or_else(|| Content::Failed.pack().unwrap_or(3));
        if let Some(v) = usize::try_from(c)
            .ok()
            .and_then(|i| self.contents.get_mut(i))
        {
            *v = packed;
        }
    }

    /// True if writes to chunk `c` may go to the device.
    fn writable(&self, c: u64) -> bool {
        writable(&self.contents, &self.active, c)
    }

    /// The entry of chunk `c`, made from `node` if it has none. `None` if it
    /// has none and `node` is empty.
    fn activate(
        &mut self,
        c: u64,
        node: &mut Option<RBTreeNodeReservation<u64, Active>>,
    ) -> Option<&mut Active> {
        if self.active.get(&c).is_none() {
            let r = node.take()?;
            self.active.insert(r.into_node(c, Active::new()));
        }
        self.active.get_mut(&c)
    }

    /// Drops chunk `c`'s entry if nothing is going on with it any more.
    fn settle(&mut self, c: u64) {
        if self.active.get(&c).is_some_and(Active::idle) {
            self.active.remove(&c);
        }
    }

    /// Moves the image writes parked on chunk `c` to `into`.
    fn take_parked(&mut self, c: u64, into: &mut BioList) {
        if let Some(a) = self.active.get_mut(&c) {
            while let Some(bio) = a.parked.pop() {
                into.push(bio);
                self.parked = self.parked.saturating_sub(1);
            }
        }
        self.settle(c);
    }
}

/// Where chunk `c`'s content is, in `contents`. A chunk beyond the device
/// reads as lost.
fn content(contents: &KVVec<u64>, c: u64) -> Content {
    usize::try_from(c)
        .ok()
        .and_then(|i| contents.get(i))
        .map_or(Content::Failed, |v| Content::unpack(*v))
}

/// True if writes to chunk `c` may go to the device: its old data is safe
/// and nobody reads it from the device.
fn writable(contents: &KVVec<u64>, active: &RBTree<u64, Active>, c: u64) -> bool {
    content(contents, c).lets_writes_pass() && active.get(&c).map_or(true, |a| a.readers == 0)
}

/// Copy-on-write state of one device of a snapshot.
#[pin_data]
pub(crate) struct DiffArea {
    geometry: ChunkGeometry,
    orig: ARef<BlockDevice>,
    tracker: Arc<Tracker>,
    store: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    /// Image reads and writes.
    image_wq: Arc<OwnedQueue>,
    /// Clones of image reads sent to the device or a storage device.
    bios: Arc<BioSet>,
    max_copies: u32,
    /// 0, or the negative errno that made the snapshot of this device unusable.
    error: AtomicI32,
    /// Chunks stored so far.
    stored: AtomicU32,
    #[pin]
    state: SpinLock<State>,
    /// Signalled when copies finish, for writers waiting for room and for
    /// the end of the snapshot waiting for the last copy.
    #[pin]
    room: CondVar,
    /// Signalled when copy-on-write stops, for [`DiffArea::watch`].
    #[pin]
    stop: CondVar,
}

/// The work item of [`DiffArea::watch`]: its own lockdep class, since it
/// may drop the last reference of an area, and with it the area's copy
/// queue, whose items are closures of `Queue::try_spawn`.
#[pin_data]
struct Watch {
    area: Arc<DiffArea>,
    #[pin]
    work: Work<Watch>,
}

kernel::impl_has_work! {
    impl HasWork<Self> for Watch { self.work }
}

impl WorkItem for Watch {
    type Pointer = Pin<KBox<Watch>>;

    fn run(this: Pin<KBox<Watch>>) {
        this.area.watch();
    }
}

/// What copy-on-write does with a write, see [`DiffArea::cow`].
pub(crate) enum Verdict {
    /// It may go on at once.
    Pass(Admitted),
    /// It is held until the chunks it touches are copied.
    Held,
    /// It would be held, but it must not wait: fail it with EAGAIN.
    WouldBlock(Admitted),
}

/// Where to read a piece of the image from.
enum Source {
    Origin,
    Store(u64),
    /// Being stored from memory: read it once it is.
    Wait,
}

impl DiffArea {
    /// Creates the difference area of `orig`. Copies run on `copy_wq`,
    /// the snapshot's, at most `chunk_maximum_in_queue` before writers
    /// wait; image I/O on `image_wq`, with clones from `bios`.
    pub(crate) fn new(
        tracker: Arc<Tracker>,
        geometry: ChunkGeometry,
        store: Arc<DiffStorage>,
        events: Arc<EventQueue>,
        copy_wq: Arc<OwnedQueue>,
        image_wq: Arc<OwnedQueue>,
        bios: Arc<BioSet>,
    ) -> Result<Arc<Self>> {
        // The state of every chunk, known at take: [`ChunkGeometry::state_bytes`].
        let count = usize::try_from(geometry.count).map_err(|_| ENOMEM)?;
        let contents = KVVec::from_elem(0u64, count, GFP_KERNEL)?;
        Arc::pin_init(
            try_pin_init!(Self {
                geometry,
                orig: tracker.bdev_ref(),
                tracker,
                store,
                events,
                image_wq,
                bios,
                max_copies: params::chunk_maximum_in_queue.get().max(1),
                error: AtomicI32::new(0),
                stored: AtomicU32::new(0),
                state <- new_spinlock!(State {
                    contents,
                    active: RBTree::new(),
                    held: RBTree::new(),
                    next_held: 0,
                    copies: 0,
                    finished: 0,
                    parked: 0,
                    throttled: 0,
                    shut_down: false,
                    copy_wq: Some(copy_wq),
                }, "DiffArea::state"),
                room <- new_condvar!("DiffArea::room"),
                stop <- new_condvar!("DiffArea::stop"),
            }),
            GFP_NOIO,
        )
    }

    /// The chunk geometry.
    pub(crate) fn geometry(&self) -> &ChunkGeometry {
        &self.geometry
    }

    /// 0, or the negative errno that made the snapshot unusable.
    pub(crate) fn error(&self) -> i32 {
        self.error.load(Ordering::Relaxed)
    }

    /// Number of chunks stored.
    pub(crate) fn stored_chunks(&self) -> u32 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Marks the snapshot of this device unusable; the first error wins.
    pub(crate) fn set_error(&self, e: Error) {
        if self
            .error
            .compare_exchange(0, e.to_errno(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            pr_err!(
                "snapshot of {} [{}] is corrupted: {:?}\n",
                self.orig.name(),
                self.orig.dev(),
                e
            );
            let dev = self.orig.dev();
            let mut data = [0u8; 12];
            data[0..4].copy_from_slice(&dev.major().to_ne_bytes());
            data[4..8].copy_from_slice(&dev.minor().to_ne_bytes());
            // Upstream's event carries the errno as a positive number.
            data[8..12].copy_from_slice(&(-e.to_errno()).to_ne_bytes());
            self.events.push(uapi::event::CORRUPTED, &data);
        }
    }

    /// Handles a write that reached the device; `sector` is its first
    /// sector. Returns the bio if it may go on at once, `None` if it is
    /// held until the chunks it touches are copied.
    ///
    /// A `nowait` write (REQ_NOWAIT) is never held: it comes back as
    /// [`Verdict::WouldBlock`], to be failed with EAGAIN while its submitter
    /// can still retry it where it may wait (io_uring retries only an
    /// EAGAIN it sees while submitting). Held and resubmitted later with
    /// REQ_NOWAIT, the block layer could fail it with EAGAIN (a split, no
    /// free tag) where nobody retries it. Its chunks' copies start anyway.
    pub(crate) fn cow(self: &Arc<Self>, sector: u64, bio: Admitted, nowait: bool) -> Verdict {
        let chunks = self
            .geometry
            .chunks_touched(sector, u64::from(bio.sectors()));
        if chunks.is_empty() || self.error() != 0 {
            return Verdict::Pass(bio);
        }
        // Fast path: every chunk already writable.
        {
            let state = self.state.lock();
            if state.shut_down || chunks.clone().all(|c| state.writable(c)) {
                return Verdict::Pass(bio);
            }
        }
        // Memory, outside the lock: a node for the bio, room for the copies.
        let n = chunks.clone().count();
        let (Ok(held_node), Ok(mut to_copy)) = (
            RBTreeNodeReservation::new(GFP_NOIO),
            KVec::with_capacity(n, GFP_NOIO),
        ) else {
            self.set_error(ENOMEM);
            return Verdict::Pass(bio);
        };
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            if state.shut_down || self.error() != 0 {
                return Verdict::Pass(bio);
            }
            let mut hold = false;
            for c in chunks.clone() {
                if state.content(c) == Content::Origin {
                    state.set_content(c, Content::Copying);
                    // Cannot fail: the capacity is there.
                    let _ = to_copy.push(c, GFP_NOIO);
                }
                hold |= !state.writable(c);
            }
            state.copies += to_copy.len() as u32;
            if !hold || nowait {
                drop(guard);
                self.start_copies(&to_copy);
                return if hold {
                    Verdict::WouldBlock(bio)
                } else {
                    Verdict::Pass(bio)
                };
            }
            let key = state.next_held;
            state.next_held += 1;
            state
                .held
                .insert(held_node.into_node(key, HeldWrite { bio, chunks }));
        }
        self.start_copies(&to_copy);
        Verdict::Held
    }

    /// Queues the copy of each chunk in `chunks`.
    fn start_copies(self: &Arc<Self>, chunks: &[u64]) {
        if chunks.is_empty() {
            return;
        }
        let queue = self.state.lock().copy_wq.clone();
        for &c in chunks {
            let area = self.clone();
            let spawned = match &queue {
                Some(q) => q.try_spawn(GFP_NOIO, move || area.copy_chunk(c)).is_ok(),
                None => false,
            };
            if !spawned {
                self.set_error(ENOMEM);
                self.chunk_done(c, Content::Failed);
            }
        }
    }

    /// Whether more copies are queued than writers are let to add to:
    /// [`Self::throttle`] would wait.
    pub(crate) fn congested(&self) -> bool {
        let state = self.state.lock();
        state.copies > self.max_copies && !state.shut_down
    }

    /// Waits, if the caller may, while too many copies are queued: writers
    /// then go at the pace of the storage.
    pub(crate) fn throttle(&self) {
        let mut state = self.state.lock();
        if state.copies > self.max_copies && !state.shut_down {
            state.throttled += 1;
            while state.copies > self.max_copies && !state.shut_down {
                self.room.wait(&mut state);
            }
            state.throttled -= 1;
        }
    }

    /// Copies the original content of chunk `c` to the storage.
    fn copy_chunk(self: Arc<Self>, c: u64) {
        // Reclaim must not write to a device whose writes may wait for this
        // copy: no allocation here, nor in the storage's I/O, starts I/O.
        let _noio = NoIoScope::new();
        let span = self.geometry.chunk_span(c);
        let sectors = span.end - span.start;
        let len = (sectors << 9) as usize;
        let result = (|| -> Result<u64> {
            if self.error() != 0 || self.state.lock().shut_down {
                return Err(ECANCELED);
            }
            let pages = io::read_pages(&self.orig, span.start, len, true)?;
            // The old data is safe in memory: the writes held for it go on
            // while it is stored.
            self.chunk_buffered(c);
            let at = self.store.alloc(sectors).map_err(|e| match e {
                NoRoom::Full => ENOSPC,
                NoRoom::Error(e) => e,
            })?;
            self.store.write(at, pages, len)?;
            Ok(at)
        })();
        let content = match result {
            Ok(at) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                Content::Stored(at)
            }
            Err(e) => {
                if e != ECANCELED {
                    self.set_error(e);
                }
                Content::Failed
            }
        };
        self.chunk_done(c, content);
    }

    /// Records that chunk `c`'s old data was read into memory, and releases
    /// the writes that no longer need to wait.
    fn chunk_buffered(&self, c: u64) {
        {
            let mut state = self.state.lock();
            if state.content(c) == Content::Copying {
                state.set_content(c, Content::Buffered);
            }
        }
        self.release_writable();
    }

    /// Waits until no copy is queued or running. After [`Self::shut_down`]
    /// none starts any more: then no copy of this area outlives this call.
    ///
    /// Then lets go of the snapshot's copy queue: the last reference to this
    /// area may be dropped in a work item (a copy's, or a deferred release),
    /// and a work item must not destroy a work queue.
    pub(crate) fn wait_copies(&self) {
        let mut state = self.state.lock();
        while state.copies != 0 {
            self.room.wait(&mut state);
        }
        let queue = state.copy_wq.take();
        drop(state);
        drop(queue);
    }

    /// Records the end of the copy of chunk `c`, releases the writes that
    /// no longer need to wait and queues the image writes parked on it.
    fn chunk_done(self: &Arc<Self>, c: u64, content: Content) {
        let mut parked = BioList::new();
        {
            let mut state = self.state.lock();
            state.set_content(c, content);
            state.take_parked(c, &mut parked);
            state.copies = state.copies.saturating_sub(1);
            state.finished += 1;
        }
        self.room.notify_all();
        self.release_writable();
        self.unpark(parked);
    }

    /// Resubmits the held writes whose chunks are all writable, in the order
    /// they were held. One pass over the held writes: the search resumes
    /// after the last write released. A write it passed over that becomes
    /// writable meanwhile is released by whoever made it so, since every
    /// change of chunk state is followed by a call of this.
    fn release_writable(&self) {
        let mut from = 0;
        loop {
            let next = {
                let mut guard = self.state.lock();
                let State {
                    contents,
                    active,
                    held,
                    ..
                } = &mut *guard;
                let mut cursor = held.cursor_lower_bound(&from);
                loop {
                    let Some(c) = cursor else { break None };
                    let (_, w) = c.current();
                    if w.chunks.clone().all(|x| writable(contents, active, x)) {
                        break Some(c.remove_current().1.to_key_value());
                    }
                    cursor = c.move_next();
                }
            };
            match next {
                Some((key, w)) => {
                    from = key + 1;
                    w.bio.submit();
                }
                None => return,
            }
        }
    }

    /// Stops copy-on-write for good: releases every held write and fails
    /// the parked image writes. Called when the snapshot is destroyed or the
    /// device goes away.
    pub(crate) fn shut_down(&self) {
        let mut failed = BioList::new();
        let mut held = {
            let mut state = self.state.lock();
            state.shut_down = true;
            if state.parked != 0 {
                state.parked = 0;
                for a in state.active.values_mut() {
                    while let Some(bio) = a.parked.pop() {
                        failed.push(bio);
                    }
                }
            }
            core::mem::take(&mut state.held)
        };
        self.room.notify_all();
        self.stop.notify_all();
        while let Some(key) = held.iter().next().map(|(k, _)| *k) {
            if let Some(w) = held.remove(&key) {
                w.bio.submit();
            }
        }
        while let Some(bio) = failed.pop() {
            bio.end(Err(EIO));
        }
    }

    /// Starts [`Self::watch`] on `queue`, for as long as copy-on-write is
    /// on. Called once the area is switched in; ends with
    /// [`Self::shut_down`].
    pub(crate) fn start_watch(self: &Arc<Self>, queue: &Queue) -> Result {
        let w = KBox::pin_init(
            pin_init!(Watch {
                area: self.clone(),
                work <- new_work!("DiffArea::watch"),
            }),
            GFP_KERNEL,
        )?;
        // A fresh box is never queued already: this always queues.
        queue.enqueue(w);
        Ok(())
    }

    /// Watches the copies until copy-on-write stops. When writes of the
    /// device wait for copies (held until their chunks are read, or their
    /// writers throttled behind a backlog) and no copy finished for
    /// `cow_stall_timeout` seconds, the storage is stuck: typically a file
    /// system that needs memory that only those writes would free, when
    /// memory reclaim writes to this device (swap on it). The origin comes
    /// first: the snapshot of the device is marked corrupted (`ETIMEDOUT`,
    /// with its event) and the held writes go on. Copies that no write
    /// waits for (their old data read, the writes gone on) may take as long
    /// as the storage takes: a slow storage does not corrupt the snapshot.
    fn watch(&self) {
        let tick = msecs_to_jiffies(1000);
        let (mut seen, mut stalled) = (0u64, 0u32);
        let mut state = self.state.lock();
        while !state.shut_down {
            let _ = self.stop.wait_interruptible_timeout(&mut state, tick);
            // A file storage that is growing is busy, not stuck: fallocate
            // of a large step on a slow machine takes long. It gets six
            // times the time (a file system stuck in it still gives way).
            let limit = params::cow_stall_timeout
                .get()
                .saturating_mul(if self.store.growing() { 6 } else { 1 });
            // Writes held for copies, or writers throttled behind them.
            let waiting =
                state.copies != 0 && (state.held.iter().next().is_some() || state.throttled != 0);
            if state.shut_down || limit == 0 || !waiting || state.finished != seen {
                seen = state.finished;
                stalled = 0;
                continue;
            }
            stalled += 1;
            if stalled >= limit {
                let (copies, waiting) = (state.copies, state.held.iter().count());
                drop(state);
                pr_err!(
                    "{}: no chunk copy of {} finished for {} s ({} writes wait for them): the storage is stuck, the snapshot gives way to the device\n",
                    self.orig.name(),
                    copies,
                    stalled,
                    waiting
                );
                self.set_error(ETIMEDOUT);
                self.shut_down();
                return;
            }
        }
    }

    /// Decides where to read `piece` of the image from, registering as a
    /// reader of the chunk if it is the device.
    fn source(
        &self,
        chunk: u64,
        reservation: &mut Option<RBTreeNodeReservation<u64, Active>>,
    ) -> Result<Source> {
        let mut state = self.state.lock();
        if state.shut_down {
            // The device is no longer protected: its data may be newer
            // than the snapshot.
            return Err(EIO);
        }
        match state.content(chunk) {
            Content::Stored(at) => Ok(Source::Store(at)),
            Content::Failed => Err(EIO),
            Content::Buffered => Ok(Source::Wait),
            Content::Origin | Content::Copying => {
                let a = state.activate(chunk, reservation).ok_or(ENOMEM)?;
                a.readers += 1;
                Ok(Source::Origin)
            }
        }
    }

    /// Waits while chunk `c` is being stored from memory.
    fn wait_stored(&self, c: u64) {
        let mut state = self.state.lock();
        while !state.shut_down && state.content(c) == Content::Buffered {
            self.room.wait(&mut state);
        }
    }

    /// Ends a read of chunk `c` from the device. Fails with `EIO` if the
    /// snapshot was shut down meanwhile: the writes it held may have
    /// changed the data read.
    fn reader_done(&self, c: u64) -> Result {
        let (release, shut_down) = {
            let mut state = self.state.lock();
            let mut release = false;
            if let Some(a) = state.active.get_mut(&c) {
                a.readers = a.readers.saturating_sub(1);
                release = a.readers == 0;
            }
            state.settle(c);
            (release && state.writable(c), state.shut_down)
        };
        if release {
            self.release_writable();
        }
        if shut_down {
            return Err(EIO);
        }
        Ok(())
    }

    /// Serves a read of the snapshot image: fills `bio` with the content the
    /// device had when the snapshot was taken. Sleeps.
    pub(crate) fn read_image(&self, bio: &mut InFlightBio) -> Result {
        if self.error() != 0 {
            return Err(EIO);
        }
        let mut offset = 0usize;
        for piece in self.geometry.pieces(bio.sector(), u64::from(bio.sectors())) {
            let len = (piece.sectors << 9) as usize;
            let mut reservation = Some(RBTreeNodeReservation::new(GFP_NOIO)?);
            let mut source = self.source(piece.chunk, &mut reservation)?;
            while let Source::Wait = source {
                // Copies run on a queue of their own and wait only for
                // I/O: this wait ends.
                self.wait_stored(piece.chunk);
                source = self.source(piece.chunk, &mut reservation)?;
            }
            let pages = match source {
                Source::Wait => return Err(EIO),
                Source::Store(at) => {
                    let start = self.geometry.chunk_span(piece.chunk).start;
                    self.store.read(at + piece.sector - start, len)
                }
                Source::Origin => {
                    let r = io::read_pages(&self.orig, piece.sector, len, true);
                    self.reader_done(piece.chunk)?;
                    r
                }
            }?;
            copy_pages_to_bio(bio, offset, &pages, len)?;
            offset += len;
        }
        // The snapshot may have broken while we read: then the data is not
        // trustworthy.
        if self.error() != 0 {
            return Err(EIO);
        }
        Ok(())
    }
}

/// What an image write found when it looked at its chunks.
enum WriteCheck {
    /// Every chunk is in the storage and no other image write changes it:
    /// they are marked busy; their addresses in the storage, in order.
    Go(InFlightBio, KVec<u64>),
    /// Parked on a chunk that is being copied or written.
    Parked,
    /// A chunk was lost, memory is short, or the snapshot is gone.
    Fail(InFlightBio, Error),
}

impl DiffArea {
    /// Serves a read of the image without copying its data: a bio within
    /// one chunk (the image's queue limits cut bios at chunk borders) is
    /// sent on, through a clone, to the device if the chunk is still there
    /// or to the storage device that holds it. Its completion ends in a
    /// work item of the image queue, which needs no lock of an interrupt
    /// handler's. Other reads (memory and file storages, a bio across
    /// chunks, no memory for the clone) are served in a work item.
    pub(crate) fn submit_image_read(self: &Arc<Self>, bio: InFlightBio) {
        if self.error() != 0 {
            bio.end(Err(EIO));
            return;
        }
        let sector = bio.sector();
        let sectors = u64::from(bio.sectors());
        let chunks = self.geometry.chunks_touched(sector, sectors);
        if chunks.end != chunks.start + 1 {
            self.queue_image_read(bio);
            return;
        }
        let c = chunks.start;
        // A node is needed only to register as a reader of a chunk that has
        // none: reserved on a miss, not for every read.
        let mut reservation = None;
        let mut source = self.source(c, &mut reservation);
        if matches!(source, Err(e) if e == ENOMEM) {
            reservation = RBTreeNodeReservation::new(GFP_NOIO).ok();
            source = self.source(c, &mut reservation);
        }
        match source {
            Ok(Source::Origin) => {
                let orig = self.orig.clone();
                if let Err(bio) = self.send_image_read(bio, &orig, sector, Some(c), None) {
                    // No memory for the clone: read in a work item.
                    let _ = self.reader_done(c);
                    self.queue_image_read(bio);
                }
            }
            Ok(Source::Store(at)) => {
                let start = self.geometry.chunk_span(c).start;
                match self.store.device_at(at + sector - start, sectors) {
                    Some((dev, to)) => {
                        let bdev = ARef::from(dev.bdev());
                        if let Err(bio) = self.send_image_read(bio, &bdev, to, None, Some(dev)) {
                            self.queue_image_read(bio);
                        }
                    }
                    None => self.queue_image_read(bio),
                }
            }
            // Being stored: the work item waits for it.
            Ok(Source::Wait) => self.queue_image_read(bio),
            // The chunk is lost, or the snapshot is gone.
            Err(e) if e != ENOMEM => bio.end(Err(e)),
            Err(_) => self.queue_image_read(bio),
        }
    }

    /// Sends the image read `bio` to `sector` of `to` through a clone: the
    /// device itself if `reader` is the chunk it registered as a reader of,
    /// else the storage device `dev`, held open until the read is done. The
    /// bio comes back if there is no memory for that.
    fn send_image_read(
        self: &Arc<Self>,
        bio: InFlightBio,
        to: &BlockDevice,
        sector: u64,
        reader: Option<u64>,
        dev: Option<Arc<Device>>,
    ) -> core::result::Result<(), InFlightBio> {
        let Ok(later) = SpawnLater::new(GFP_NOIO) else {
            return Err(bio);
        };
        let (area, wq) = (self.clone(), self.image_wq.clone());
        // Reads of the device must not meet its filter, ours.
        let bypass = reader.is_some();
        bio.remap_clone(
            to,
            sector,
            bypass,
            &self.bios,
            GFP_NOIO,
            move |result, bio| {
                // Interrupt context: the rest runs in the work item allocated
                // beforehand, where the area's lock may be taken and the last
                // references dropped. (`wq` lives as long as the module's image
                // queue, which exit destroys only after the image disks, whose
                // bio this is, were freed.)
                later.spawn(&wq, move || {
                    drop(dev);
                    let result = match reader {
                        Some(c) => result.and(area.reader_done(c)),
                        None => result,
                    };
                    area.end_image_read(bio, result);
                });
            },
        )
        .map_err(|(_, bio)| bio)
    }

    /// Ends a read of the image that went to a device: it fails if the
    /// snapshot broke meanwhile, since then its data cannot be trusted.
    fn end_image_read(&self, bio: InFlightBio, result: Result) {
        let result = result.and(if self.error() != 0 { Err(EIO) } else { Ok(()) });
        bio.end(result);
    }

    /// Queues a read of the image.
    pub(crate) fn queue_image_read(self: &Arc<Self>, bio: InFlightBio) {
        let area = self.clone();
        let spawned = self.image_wq.try_spawn(GFP_NOIO, move || {
            // Reclaim may be waiting for this read (a file system on the
            // image): its allocations start no I/O.
            let _noio = NoIoScope::new();
            let mut bio = bio;
            let result = area.read_image(&mut bio);
            bio.end(result);
        });
        if let Err(e) = spawned {
            // The closure, and the bio with it, was dropped: its drop fails
            // the bio.
            pr_err!("image read: {:?}\n", e);
        }
    }

    /// Queues a write to the image.
    pub(crate) fn queue_image_write(self: &Arc<Self>, bio: InFlightBio) {
        let area = self.clone();
        let spawned = self.image_wq.try_spawn(GFP_NOIO, move || {
            // As for reads.
            let _noio = NoIoScope::new();
            area.write_image(bio)
        });
        if let Err(e) = spawned {
            pr_err!("image write: {:?}\n", e);
        }
    }

    /// Queues the image writes of `parked` again.
    fn unpark(self: &Arc<Self>, mut parked: BioList) {
        while let Some(bio) = parked.pop() {
            self.queue_image_write(bio);
        }
    }

    /// Looks at the chunks an image write touches. If all are in the
    /// storage and no other image write changes them, marks them busy.
    /// Otherwise parks the write on the first one that is not ready, after
    /// starting the copies of those still on the device only.
    fn check_image_write(self: &Arc<Self>, bio: InFlightBio) -> WriteCheck {
        let chunks = self
            .geometry
            .chunks_touched(bio.sector(), u64::from(bio.sectors()));
        let n = chunks.clone().count();
        // Tree nodes for chunks not in the tree yet, reserved outside the
        // lock.
        let mut nodes = match KVec::with_capacity(n, GFP_NOIO) {
            Ok(v) => v,
            Err(_) => return WriteCheck::Fail(bio, ENOMEM),
        };
        for _ in 0..n {
            match RBTreeNodeReservation::new(GFP_NOIO) {
                // Cannot fail: the capacity is there.
                Ok(r) => drop(nodes.push(r, GFP_NOIO)),
                Err(_) => return WriteCheck::Fail(bio, ENOMEM),
            }
        }
        let (mut addrs, mut to_copy) = match (
            KVec::with_capacity(n, GFP_NOIO),
            KVec::with_capacity(n, GFP_NOIO),
        ) {
            (Ok(a), Ok(c)) => (a, c),
            _ => return WriteCheck::Fail(bio, ENOMEM),
        };
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.shut_down {
            return WriteCheck::Fail(bio, EIO);
        }
        let mut blocked = None;
        for c in chunks.clone() {
            let busy = state.active.get(&c).is_some_and(|a| a.image_busy);
            match state.content(c) {
                Content::Failed => return WriteCheck::Fail(bio, EIO),
                Content::Stored(at) if !busy => {
                    // Cannot fail: the capacity is there.
                    let _ = addrs.push(at, GFP_NOIO);
                }
                _ => {
                    blocked.get_or_insert(c);
                }
            }
        }
        let Some(first) = blocked else {
            for c in chunks {
                // A reservation per chunk was made above.
                let mut node = nodes.pop();
                if let Some(a) = state.activate(c, &mut node) {
                    a.image_busy = true;
                }
            }
            return WriteCheck::Go(bio, addrs);
        };
        // Start the copies of the chunks that are still only on the device.
        for c in chunks {
            if state.content(c) == Content::Origin {
                state.set_content(c, Content::Copying);
                let _ = to_copy.push(c, GFP_NOIO);
            }
        }
        state.copies += to_copy.len() as u32;
        let mut node = nodes.pop();
        match state.activate(first, &mut node) {
            Some(a) => {
                a.parked.push(bio);
                state.parked += 1;
            }
            // A reservation per chunk was made above.
            None => {
                drop(guard);
                self.start_copies(&to_copy);
                return WriteCheck::Fail(bio, ENOMEM);
            }
        }
        drop(guard);
        self.start_copies(&to_copy);
        WriteCheck::Parked
    }

    /// Serves a write to the snapshot image, in a work item: the data goes
    /// to the storage, after the chunk was copied there from the device if
    /// needed, and never to the device. The blocks are marked changed in the
    /// CBT, so that the next backup reads them again.
    ///
    /// A write whose chunk is not ready does not wait: it is parked on the
    /// chunk and queued again when the chunk's copy, or the other image
    /// write to it, is done.
    fn write_image(self: &Arc<Self>, bio: InFlightBio) {
        if self.error() != 0 {
            bio.end(Err(EIO));
            return;
        }
        let (bio, addrs) = match self.check_image_write(bio) {
            WriteCheck::Go(bio, addrs) => (bio, addrs),
            WriteCheck::Fail(bio, e) => {
                bio.end(Err(e));
                return;
            }
            WriteCheck::Parked => return,
        };
        let result = self.write_pieces(&bio, &addrs);
        // The chunks are free for other image writes again.
        let mut parked = BioList::new();
        {
            let mut state = self.state.lock();
            for c in self
                .geometry
                .chunks_touched(bio.sector(), u64::from(bio.sectors()))
            {
                if let Some(a) = state.active.get_mut(&c) {
                    a.image_busy = false;
                }
                state.take_parked(c, &mut parked);
            }
        }
        bio.end(result);
        self.unpark(parked);
    }

    /// Writes the pieces of `bio` to the chunks in the storage, at
    /// `addrs`, one per chunk in order.
    fn write_pieces(&self, bio: &InFlightBio, addrs: &[u64]) -> Result {
        let mut offset = 0usize;
        let mut at = addrs.iter();
        for piece in self.geometry.pieces(bio.sector(), u64::from(bio.sectors())) {
            let span = self.geometry.chunk_span(piece.chunk);
            let chunk_len = span.end - span.start;
            let at = *at.next().ok_or(EIO)?;
            // Read-modify-write whole 4 KiB blocks of the stored chunk.
            let rel = piece.sector - span.start;
            let first = rel & !7;
            let last = (rel + piece.sectors).next_multiple_of(8).min(chunk_len);
            let len = ((last - first) << 9) as usize;
            let mut pages = self.store.read(at + first, len)?;
            let bytes = (piece.sectors << 9) as usize;
            let mut data = kernel::alloc::KVVec::from_elem(0u8, bytes, GFP_NOIO)?;
            bio.copy_to_slice(offset, &mut data)?;
            io::write_slice_to_pages(&mut pages, ((rel - first) << 9) as usize, &data)?;
            self.store.write(at + first, pages, len)?;
            self.tracker.mark_changed(piece.sector, piece.sectors);
            offset += bytes;
        }
        Ok(())
    }
}

/// Copies `len` bytes of `pages` into `bio` at byte `offset`.
fn copy_pages_to_bio(bio: &mut InFlightBio, offset: usize, pages: &[Page], len: usize) -> Result {
    io::read_pages_to(pages, len, |done, bytes| {
        bio.copy_from_slice(offset + done, bytes)
    })
}
