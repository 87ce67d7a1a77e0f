// SPDX-License-Identifier: GPL-2.0

//! The difference area: copy-on-write state of one device of a taken
//! snapshot.
//!
//! The device is cut into chunks ([`crate::chunk`]). The first write to a
//! chunk after the snapshot was taken is held until the chunk's original
//! content has been read from the device and stored in the difference
//! storage; later writes to stored chunks pass at once. Chunk state is kept
//! sparsely, in a tree of the chunks that were written or are being read.
//!
//! Reading the snapshot image takes stored chunks from the storage and the
//! others from the device itself. Such a read registers as a reader of its
//! chunk, and writes to the chunk are held until it finished, so that the
//! device cannot change under it.
//!
//! Nothing here sleeps in the submit path: chunks are copied by work items on
//! the module's workqueue, and held writes are resubmitted from there.

use crate::{
    chunk::ChunkGeometry,
    diff_storage::{DiffStorage, NoRoom},
    event_queue::EventQueue,
    io,
    tracker::Tracker,
    uapi,
};
use core::ops::Range;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use kernel::{
    alloc::{flags::GFP_NOIO, KVec},
    block::{bdev::BlockDevice, bio::InFlightBio, filter::Admitted},
    error::code::*,
    new_condvar, new_mutex, new_spinlock,
    page::Page,
    prelude::*,
    rbtree::{RBTree, RBTreeNodeReservation},
    sync::{Arc, CondVar, Mutex, SpinLock},
    types::ARef,
    workqueue::OwnedQueue,
};

/// Where a chunk's snapshot content is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Content {
    /// Still on the device: nothing wrote to the chunk yet.
    Origin,
    /// Being copied to the storage.
    Copying,
    /// In the storage, at this sector.
    Stored(u64),
    /// Lost: the copy failed.
    Failed,
}

/// A chunk that was written, or is being read from the device.
struct Chunk {
    content: Content,
    /// Image reads of this chunk from the device in progress.
    readers: u32,
}

impl Chunk {
    /// True if writes to the chunk may go to the device.
    fn writable(&self) -> bool {
        matches!(self.content, Content::Stored(_) | Content::Failed) && self.readers == 0
    }
}

/// A write held until all the chunks it touches are writable.
struct HeldWrite {
    bio: Admitted,
    chunks: Range<u64>,
}

struct State {
    chunks: RBTree<u64, Chunk>,
    held: RBTree<u64, HeldWrite>,
    next_held: u64,
    /// Chunk copies queued or running.
    copies: u32,
    /// Set when the snapshot goes away: nothing is held any more.
    shut_down: bool,
}

/// Copy-on-write state of one device of a snapshot.
#[pin_data]
pub(crate) struct DiffArea {
    geometry: ChunkGeometry,
    orig: ARef<BlockDevice>,
    tracker: Arc<Tracker>,
    store: Arc<DiffStorage>,
    events: Arc<EventQueue>,
    wq: Arc<OwnedQueue>,
    max_copies: u32,
    /// 0, or the negative errno that made the snapshot of this device unusable.
    error: AtomicI32,
    /// Chunks stored so far.
    stored: AtomicU32,
    #[pin]
    state: SpinLock<State>,
    /// Signalled when copies finish, for writers waiting for room and for
    /// image writes waiting for a chunk.
    #[pin]
    room: CondVar,
    /// Serializes writes to the image (read-modify-write of the storage).
    #[pin]
    image_writes: Mutex<()>,
}

/// Where to read a piece of the image from.
enum Source {
    Origin,
    Store(u64),
}

impl DiffArea {
    /// Creates the difference area of `orig`.
    pub(crate) fn new(
        tracker: Arc<Tracker>,
        geometry: ChunkGeometry,
        store: Arc<DiffStorage>,
        events: Arc<EventQueue>,
        wq: Arc<OwnedQueue>,
        max_copies: u32,
    ) -> Result<Arc<Self>> {
        Arc::pin_init(
            try_pin_init!(Self {
                geometry,
                orig: tracker.bdev_ref(),
                tracker,
                store,
                events,
                wq,
                max_copies: max_copies.max(1),
                error: AtomicI32::new(0),
                stored: AtomicU32::new(0),
                state <- new_spinlock!(State {
                    chunks: RBTree::new(),
                    held: RBTree::new(),
                    next_held: 0,
                    copies: 0,
                    shut_down: false,
                }, "DiffArea::state"),
                room <- new_condvar!("DiffArea::room"),
                image_writes <- new_mutex!((), "DiffArea::image_writes"),
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
    pub(crate) fn cow(self: &Arc<Self>, sector: u64, bio: Admitted) -> Option<Admitted> {
        let chunks = self
            .geometry
            .chunks_touched(sector, u64::from(bio.sectors()));
        if chunks.is_empty() || self.error() != 0 {
            return Some(bio);
        }
        // Fast path: every chunk already writable.
        {
            let state = self.state.lock();
            if state.shut_down
                || chunks
                    .clone()
                    .all(|c| state.chunks.get(&c).is_some_and(Chunk::writable))
            {
                return Some(bio);
            }
        }
        // Reserve tree nodes outside the lock: one per chunk, one for the bio.
        let mut nodes = KVec::with_capacity(chunks.clone().count(), GFP_NOIO).ok();
        if let Some(v) = nodes.as_mut() {
            for _ in chunks.clone() {
                match RBTreeNodeReservation::new(GFP_NOIO) {
                    Ok(r) => {
                        // Cannot fail: the capacity is there.
                        let _ = v.push(r, GFP_NOIO);
                    }
                    Err(_) => {
                        nodes = None;
                        break;
                    }
                }
            }
        }
        let (Some(mut nodes), Ok(held_node)) = (nodes, RBTreeNodeReservation::new(GFP_NOIO)) else {
            self.set_error(ENOMEM);
            return Some(bio);
        };

        let mut to_copy = KVec::new();
        if to_copy.reserve(nodes.len(), GFP_NOIO).is_err() {
            self.set_error(ENOMEM);
            return Some(bio);
        }
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            if state.shut_down || self.error() != 0 {
                return Some(bio);
            }
            let mut hold = false;
            for c in chunks.clone() {
                match state.chunks.get_mut(&c) {
                    Some(chunk) => {
                        if chunk.content == Content::Origin {
                            chunk.content = Content::Copying;
                            let _ = to_copy.push(c, GFP_NOIO);
                        }
                        hold |= !chunk.writable();
                    }
                    None => {
                        // A reservation per chunk was made above.
                        let node = nodes.pop().map(|r| {
                            r.into_node(
                                c,
                                Chunk {
                                    content: Content::Copying,
                                    readers: 0,
                                },
                            )
                        });
                        if let Some(node) = node {
                            state.chunks.insert(node);
                            let _ = to_copy.push(c, GFP_NOIO);
                            hold = true;
                        }
                    }
                }
            }
            state.copies += to_copy.len() as u32;
            if !hold {
                drop(guard);
                self.start_copies(&to_copy);
                return Some(bio);
            }
            let key = state.next_held;
            state.next_held += 1;
            state
                .held
                .insert(held_node.into_node(key, HeldWrite { bio, chunks }));
        }
        self.start_copies(&to_copy);
        None
    }

    /// Queues the copy of each chunk in `chunks`.
    fn start_copies(self: &Arc<Self>, chunks: &[u64]) {
        for &c in chunks {
            let area = self.clone();
            if self
                .wq
                .try_spawn(GFP_NOIO, move || area.copy_chunk(c))
                .is_err()
            {
                self.set_error(ENOMEM);
                self.chunk_done(c, Content::Failed);
            }
        }
    }

    /// Waits, if the caller may, while too many copies are queued: writers
    /// then go at the pace of the storage.
    pub(crate) fn throttle(&self) {
        let mut state = self.state.lock();
        while state.copies > self.max_copies && !state.shut_down {
            self.room.wait(&mut state);
        }
    }

    /// Copies the original content of chunk `c` to the storage.
    fn copy_chunk(self: Arc<Self>, c: u64) {
        let span = self.geometry.chunk_span(c);
        let sectors = span.end - span.start;
        let len = (sectors << 9) as usize;
        let result = (|| -> Result<u64> {
            if self.error() != 0 || self.state.lock().shut_down {
                return Err(ECANCELED);
            }
            let pages = io::read_pages(&self.orig, span.start, len, true)?;
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

    /// Records the end of the copy of chunk `c` and releases the writes
    /// that no longer need to wait.
    fn chunk_done(&self, c: u64, content: Content) {
        {
            let mut state = self.state.lock();
            if let Some(chunk) = state.chunks.get_mut(&c) {
                chunk.content = content;
            }
            state.copies = state.copies.saturating_sub(1);
        }
        self.room.notify_all();
        self.release_writable();
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
                let State { chunks, held, .. } = &mut *guard;
                let mut cursor = held.cursor_lower_bound(&from);
                loop {
                    let Some(c) = cursor else { break None };
                    let (_, w) = c.current();
                    if w.chunks
                        .clone()
                        .all(|x| chunks.get(&x).is_some_and(Chunk::writable))
                    {
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

    /// Stops copy-on-write for good: releases every held write. Called when
    /// the snapshot is destroyed or the device goes away.
    pub(crate) fn shut_down(&self) {
        let mut held = {
            let mut state = self.state.lock();
            state.shut_down = true;
            core::mem::take(&mut state.held)
        };
        self.room.notify_all();
        while let Some(key) = held.iter().next().map(|(k, _)| *k) {
            if let Some(w) = held.remove(&key) {
                w.bio.submit();
            }
        }
    }

    /// Decides where to read `piece` of the image from, registering as a
    /// reader of the chunk if it is the device.
    fn source(
        &self,
        chunk: u64,
        reservation: &mut Option<RBTreeNodeReservation<u64, Chunk>>,
    ) -> Result<Source> {
        let mut state = self.state.lock();
        if state.shut_down {
            // The device is no longer protected: its data may be newer
            // than the snapshot.
            return Err(EIO);
        }
        match state.chunks.get_mut(&chunk) {
            Some(c) => match c.content {
                Content::Stored(at) => Ok(Source::Store(at)),
                Content::Failed => Err(EIO),
                Content::Origin | Content::Copying => {
                    c.readers += 1;
                    Ok(Source::Origin)
                }
            },
            None => {
                let r = reservation.take().ok_or(ENOMEM)?;
                state.chunks.insert(r.into_node(
                    chunk,
                    Chunk {
                        content: Content::Origin,
                        readers: 1,
                    },
                ));
                Ok(Source::Origin)
            }
        }
    }

    /// Ends a read of chunk `c` from the device. Fails with `EIO` if the
    /// snapshot was shut down meanwhile: the writes it held may have
    /// changed the data read.
    fn reader_done(&self, c: u64) -> Result {
        let (release, shut_down) = {
            let mut state = self.state.lock();
            let mut remove = false;
            let mut release = false;
            if let Some(chunk) = state.chunks.get_mut(&c) {
                chunk.readers -= 1;
                if chunk.readers == 0 {
                    remove = chunk.content == Content::Origin;
                    release = chunk.writable();
                }
            }
            if remove {
                state.chunks.remove(&c);
            }
            (release, state.shut_down)
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
            let pages = match self.source(piece.chunk, &mut reservation)? {
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

impl DiffArea {
    /// Makes sure chunk `c` is in the storage, copying it from the device
    /// if nobody did yet, and returns its address. Sleeps.
    fn stored_chunk(self: &Arc<Self>, c: u64) -> Result<u64> {
        enum Next {
            Done(Result<u64>),
            Wait,
            Copy,
        }
        loop {
            let mut reservation = Some(RBTreeNodeReservation::new(GFP_NOIO)?);
            let mut state = self.state.lock();
            let next = match state.chunks.get_mut(&c) {
                Some(ch) => match ch.content {
                    Content::Stored(at) => Next::Done(Ok(at)),
                    Content::Failed => Next::Done(Err(EIO)),
                    Content::Copying => Next::Wait,
                    Content::Origin => {
                        ch.content = Content::Copying;
                        Next::Copy
                    }
                },
                None => {
                    let r = reservation.take().ok_or(ENOMEM)?;
                    state.chunks.insert(r.into_node(
                        c,
                        Chunk {
                            content: Content::Copying,
                            readers: 0,
                        },
                    ));
                    Next::Copy
                }
            };
            match next {
                Next::Done(r) => return r,
                Next::Wait => self.room.wait(&mut state),
                Next::Copy => {
                    state.copies += 1;
                    drop(state);
                    self.clone().copy_chunk(c);
                }
            }
        }
    }

    /// Serves a write to the snapshot image: the data goes to the storage,
    /// after the chunk was copied there from the device if needed, and never
    /// to the device. The blocks are marked changed in the CBT, so that the
    /// next backup reads them again. Sleeps.
    pub(crate) fn write_image(self: &Arc<Self>, bio: &InFlightBio) -> Result {
        if self.error() != 0 {
            return Err(EIO);
        }
        let _serial = self.image_writes.lock();
        let mut offset = 0usize;
        for piece in self.geometry.pieces(bio.sector(), u64::from(bio.sectors())) {
            let span = self.geometry.chunk_span(piece.chunk);
            let chunk_len = span.end - span.start;
            let at = self.stored_chunk(piece.chunk)?;
            // Read-modify-write whole 4 KiB blocks of the stored chunk.
            let rel = piece.sector - span.start;
            let first = rel & !7;
            let last = (rel + piece.sectors).next_multiple_of(8).min(chunk_len);
            let len = ((last - first) << 9) as usize;
            let pages = self.store.read(at + first, len)?;
            let bytes = (piece.sectors << 9) as usize;
            let mut data = kernel::alloc::KVVec::from_elem(0u8, bytes, GFP_NOIO)?;
            bio.copy_to_slice(offset, &mut data)?;
            write_slice_to_pages(&pages, ((rel - first) << 9) as usize, &data)?;
            self.store.write(at + first, pages, len)?;
            self.tracker.mark_changed(piece.sector, piece.sectors);
            offset += bytes;
        }
        Ok(())
    }
}

/// Copies `data` into `pages` from byte `pos`.
fn write_slice_to_pages(pages: &[Page], pos: usize, data: &[u8]) -> Result {
    let ps = kernel::page::PAGE_SIZE;
    let mut done = 0;
    while done < data.len() {
        let p = pos + done;
        let n = (ps - p % ps).min(data.len() - done);
        let page = pages.get(p / ps).ok_or(EINVAL)?;
        // SAFETY: `data` holds `n` bytes from `done`; the page a full page.
        unsafe { page.write_raw(data.as_ptr().add(done), p % ps, n)? };
        done += n;
    }
    Ok(())
}

/// Copies `len` bytes of `pages` into `bio` at byte `offset`.
fn copy_pages_to_bio(bio: &mut InFlightBio, offset: usize, pages: &[Page], len: usize) -> Result {
    let mut buf = KVec::from_elem(0u8, kernel::page::PAGE_SIZE, GFP_NOIO)?;
    let mut done = 0;
    for page in pages {
        if done >= len {
            break;
        }
        let n = (len - done).min(kernel::page::PAGE_SIZE);
        // SAFETY: `buf` is valid for `n` bytes; the page holds at least `n`.
        unsafe { page.read_raw(buf.as_mut_ptr(), 0, n)? };
        bio.copy_from_slice(offset + done, &buf[..n])?;
        done += n;
    }
    Ok(())
}
