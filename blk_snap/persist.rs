// SPDX-License-Identifier: GPL-2.0

//! Change tracking that survives a clean reboot: the CBT state device.
//!
//! The state of each tracked device that user space registered
//! (`BLKFILTER_CTL_BLKSNAP_CBTPERSIST`, under a name stable across boots) is
//! written by `IOCTL_BLKSNAP_CBT_SAVE` to a block device of its own, which
//! no registered device overlaps, like dm-era's metadata device (the format
//! is in [`crate::persist_format`]), and optionally to a second one, its
//! mirror. The save is meant for the very end of shutdown, after file
//! systems are unmounted or read-only. It cannot miss a write, whenever it
//! runs:
//!
//! - the registered devices are sealed, and the writes in flight drained,
//!   before their maps are copied: every write that passed before is
//!   marked in the map, and a write after it is held;
//! - the first write held by a seal, or a detach, a take, a `CBTDIRTY` or a
//!   snapshot image write of a sealed device, marks that device's saved
//!   record broken on the state device (a preflush and FUA write of the
//!   header block, on both copies of a mirrored state) before it goes on;
//! - opening the state device at boot reads the saved states and marks
//!   them not clean before it returns: a crash or power cut later in that
//!   boot leaves nothing that the next boot could use.
//!
//! A saved state is restored at most once, and only onto a device that
//! saw no write and no take since it was attached, to which the block layer
//! counted no write before the attach, of the same size, geometry and
//! identity, and whose fingerprint (its file system's superblock, see
//! [`crate::fingerprint`]) is byte for byte the one taken at the save:
//! positive evidence that nothing wrote to it while the module could not
//! see it. A device without a fingerprint is restored only if user space
//! accepted that risk at the save and at the restore.
//!
//! If marking a record broken fails on the only copy, the next boot cannot
//! tell; with a mirror on another device, the copies then disagree and
//! nothing is restored.

use crate::{
    diff_storage::Device,
    fingerprint::{self, Proof, Region},
    io,
    persist_format::{
        decode_records, decode_region, encode_region, fnv1a, id_bytes, is_broken, set_broken,
        unclean_block, valid_id, valid_identity, FormatError, Header, Now, RecordHeader, Refusal,
        AREA_OFFSET, BLOCK_LEN, FLAG_CLEAN, FNV_START, IDENTITY_LEN, ID_LEN, MAX_RECORDS,
        RECORD_UNVERIFIED,
    },
    snapshot::globals,
    tracker::Tracker,
};
use kernel::{
    alloc::{
        flags::{GFP_KERNEL, GFP_NOIO},
        KVVec, KVec,
    },
    block::bdev::BlockDevice,
    error::code::*,
    fs::file::{flags::O_LARGEFILE, File},
    new_mutex, new_spinlock,
    prelude::*,
    str::CStr,
    sync::{Arc, Mutex, SpinLock},
    task::NoIoScope,
    time::msecs_to_jiffies,
    uuid::Uuid,
    workqueue::{Queue, SpawnLater},
};

/// The largest record area read back: far more than any device needs (a
/// byte per CBT block and map, at most 2^21 blocks by default).
const AREA_MAX: u64 = 1 << 30;

/// How long a save waits for the writes in flight on the devices it seals,
/// and a restore for the requests of a device's queue.
const DRAIN_MS: u32 = 30_000;

/// A state saved at the last shutdown, not used yet.
struct Saved {
    header: RecordHeader,
    /// Saved clean and not broken since, on every copy.
    clean: bool,
    regions: KVec<Region>,
    fingerprint: KVVec<u8>,
    active: KVVec<u8>,
    read: KVVec<u8>,
}

/// A device registered for the next save.
struct Registered {
    id: [u8; ID_LEN],
    tracker: Arc<Tracker>,
    /// What its registration under `id` answered: a repeat (udev and the
    /// boot unit may both run) answers the same.
    restored: i32,
    identity: [u8; IDENTITY_LEN],
    /// User space accepts a restore without a fingerprint.
    unverified: bool,
    /// Its record in the state on the devices, while that state is clean
    /// and the device sealed.
    record: Option<u32>,
}

/// A copy of the state: a state device and its header block as it is on
/// the device.
struct Copy {
    dev: Arc<Device>,
    block: KVVec<u8>,
}

struct Inner {
    copies: KVec<Copy>,
    /// What opening the devices found: records, and whether they may be
    /// restored.
    found: (u32, bool),
    /// The header the first copy had when it was opened.
    opened: Header,
    saved: KVec<Saved>,
    registered: KVec<Registered>,
    /// The last save's sequence number.
    sequence: u64,
}

/// What `BLKFILTER_CTL_BLKSNAP_CBTPERSIST` answers.
pub(crate) struct Registration {
    /// 1, 0, or a negative errno, as `restored` of the UAPI says.
    pub(crate) restored: i32,
    /// Writes the block layer counted before the attach; `u64::MAX` if it
    /// cannot count them.
    pub(crate) writes_before: u64,
    /// What would prove the device unwritten, as it is now.
    pub(crate) proof: Proof,
}

/// The module's CBT state device.
#[pin_data]
pub(crate) struct Persist {
    #[pin]
    inner: Mutex<Inner>,
    /// The work item that breaks seals, allocated before a seal can be
    /// met: the write path that finds a seal cannot allocate.
    #[pin]
    breaker: SpinLock<Option<SpawnLater<fn()>>>,
}

/// Whether two block devices share sectors: the same one, or a disk and
/// one of its partitions.
fn overlaps(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.dev() == b.dev() || a.whole().dev() == b.dev() || b.whole().dev() == a.dev()
}

/// The errno of a refusal, for `restored`, and why, for the log.
fn refusal(why: Refusal) -> (u32, &'static str) {
    use kernel::bindings;
    match why {
        Refusal::NotClean => (
            bindings::ESTALE,
            "it was not saved clean, or changed after the save",
        ),
        Refusal::Changed => (
            bindings::EBUSY,
            "the device was written since it was attached",
        ),
        Refusal::WrittenBefore => (
            bindings::EBUSY,
            "the device was written before it was attached",
        ),
        Refusal::Geometry => (
            bindings::EMEDIUMTYPE,
            "the device's size or geometry differs",
        ),
        Refusal::Identity => (
            bindings::EXDEV,
            "it was saved for another device (identity, partition or start differs)",
        ),
        Refusal::Unverified => (
            bindings::ENOKEY,
            "nothing proves the device unwritten since the save (no file system to fingerprint), and that risk was not accepted",
        ),
        Refusal::Fingerprint => (
            bindings::EKEYREJECTED,
            "its file system changed since the save: something wrote to it while it was not tracked",
        ),
    }
}

impl Persist {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            inner <- new_mutex!(Inner {
                copies: KVec::new(),
                found: (0, false),
                opened: Header::default(),
                saved: KVec::new(),
                registered: KVec::new(),
                sequence: 0,
            }, "Persist::inner"),
            breaker <- new_spinlock!(None, "Persist::breaker"),
        })
    }

    /// `IOCTL_BLKSNAP_CBT_STATE_DEVICE`: opens the state device at `path`
    /// (with `mirror`, its mirror) and consumes what it holds. Returns the
    /// records read and whether they may be restored.
    pub(crate) fn open(&self, path: &CStr, format: bool, mirror: bool) -> Result<(u32, bool)> {
        // Which device, before any lock: opening takes the disk's
        // open_mutex, which must not nest in ours.
        let devt = {
            let probe = File::open(path, O_LARGEFILE, 0).inspect_err(|e| {
                pr_err!("CBT state device {}: cannot open: {:?}\n", path, e);
            })?;
            let Some(bdev) = probe.bdev() else {
                pr_err!("CBT state device {}: not a block device\n", path);
                return Err(ENOTBLK);
            };
            bdev.dev()
        };
        {
            let inner = self.inner.lock();
            let want = usize::from(mirror);
            if let Some(c) = inner.copies.iter().find(|c| c.dev.bdev().dev() == devt) {
                if !format
                    && inner.copies.len() > want
                    && inner.copies[want].dev.bdev().dev() == devt
                {
                    return Ok(inner.found);
                }
                pr_err!(
                    "CBT state device {}: {} is open as a state device already\n",
                    path,
                    c.dev.bdev().name()
                );
                return Err(EBUSY);
            }
            if inner.copies.len() != want {
                if mirror {
                    pr_err!(
                        "CBT state device {}: a mirror needs a state device opened first, and at most one\n",
                        path
                    );
                    return Err(if inner.copies.is_empty() {
                        ENXIO
                    } else {
                        EBUSY
                    });
                }
                pr_err!(
                    "CBT state device {}: {} is the state device already\n",
                    path,
                    inner.copies[0].dev.bdev().name()
                );
                return Err(EBUSY);
            }
        }
        let dev = Arc::new(Device::open(path)?, GFP_KERNEL)?;
        // As in `save`.
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        if inner.copies.len() != usize::from(mirror) {
            // Another caller opened one meanwhile.
            drop(inner);
            drop(dev);
            return self.open(path, false, mirror);
        }
        if let Some(r) = inner
            .registered
            .iter()
            .find(|r| overlaps(r.tracker.bdev(), dev.bdev()))
        {
            pr_err!(
                "CBT state device {}: it shares sectors with {}, whose state it would keep\n",
                path,
                r.tracker.bdev().name()
            );
            return Err(EBUSY);
        }
        if let Some(c) = inner.copies.first() {
            if overlaps(c.dev.bdev(), dev.bdev()) {
                pr_err!(
                    "CBT state device {}: it shares sectors with the state device {}: a mirror must be another device\n",
                    path,
                    c.dev.bdev().name()
                );
                return Err(EBUSY);
            }
        }
        let bdev = dev.bdev();
        let state = if format {
            Err(FormatError::NoHeader)
        } else {
            read_state(bdev, !mirror)
        };
        let (mut block, header, saved) = match state {
            Ok(found) => found,
            Err(FormatError::NoHeader) if !format => {
                pr_err!(
                    "CBT state device {}: no blk-snap state on it; format it first\n",
                    path
                );
                return Err(ENODATA);
            }
            Err(e) => {
                if !format {
                    pr_warn!(
                        "CBT state device {}: its state is unusable ({:?}); it starts empty\n",
                        path,
                        e
                    );
                }
                let mut b = KVVec::from_elem(0u8, BLOCK_LEN, GFP_KERNEL)?;
                Header::default().encode(&mut b);
                (b, Header::default(), KVec::new())
            }
        };
        // Consumed: not clean on the device before the states are used.
        unclean_block(&mut block);
        write_block(bdev, &block).inspect_err(|e| {
            pr_err!(
                "CBT state device {}: cannot write its header: {:?}\n",
                path,
                e
            );
        })?;
        if mirror {
            Self::add_mirror(&mut inner, &header, &block, format);
        } else {
            inner.saved = saved;
            inner.opened = header;
            inner.sequence = header.sequence;
            if header.copies > 1 {
                // Saved mirrored: nothing is clean until the mirror agrees.
                pr_info!(
                    "CBT state device {}: saved mirrored; its states wait for the mirror\n",
                    bdev.name()
                );
            }
        }
        let records = inner.saved.len() as u32;
        // Saved clean, and for a mirrored state, the mirror agrees.
        let waiting = inner.opened.copies > 1;
        let usable = if waiting {
            0
        } else {
            inner.saved.iter().filter(|s| s.clean).count()
        };
        pr_info!(
            "CBT state device {}{}: {} saved device states, {} of them clean{}\n",
            bdev.name(),
            if mirror { " (mirror)" } else { "" },
            records,
            usable,
            if waiting {
                " (waiting for the mirror)"
            } else {
                ""
            }
        );
        let clean = inner.opened.clean() && !waiting && (records == 0 || usable > 0);
        inner.found = (records, clean);
        inner.copies.push(Copy { dev, block }, GFP_KERNEL)?;
        Ok(inner.found)
    }

    /// Takes the mirror's header into account: a state saved mirrored is
    /// clean only where both copies say so.
    fn add_mirror(inner: &mut Inner, header: &Header, block: &[u8], format: bool) {
        let primary = inner.opened;
        if primary.copies <= 1 {
            // Saved on one device: the mirror holds nothing of it.
            return;
        }
        let agree = !format && primary.agrees(header) && header.copy == 1 && primary.copy == 0;
        if !agree {
            pr_warn!(
                "CBT state: the mirror does not hold the same save as the state device: no saved state is restored\n"
            );
        }
        for (i, s) in inner.saved.iter_mut().enumerate() {
            // The mirror's block was read before it was consumed: its
            // broken bits are those of the save.
            s.clean = s.clean && agree && !is_broken(block, i as u32);
        }
        inner.opened.copies = 1;
    }

    /// `BLKFILTER_CTL_BLKSNAP_CBTPERSIST`: registers `tracker` under `id`
    /// and restores the state saved under it if it may be.
    pub(crate) fn register(
        &self,
        tracker: &Arc<Tracker>,
        id: &[u8; ID_LEN],
        identity: &[u8; IDENTITY_LEN],
        unverified: bool,
    ) -> Result<Registration> {
        if !valid_id(id) {
            pr_err!("{}: a CBT state name is 1 to 63 bytes\n", tracker.dev());
            return Err(EINVAL);
        }
        if !valid_identity(identity) {
            pr_err!(
                "{}: a device identity is at most {} bytes and a NUL\n",
                tracker.dev(),
                IDENTITY_LEN - 1
            );
            return Err(EINVAL);
        }
        let name = id_bytes(id);
        if self.inner.lock().copies.is_empty() {
            pr_err!(
                "{}: no CBT state device is open to save its state on\n",
                tracker.dev()
            );
            return Err(ENXIO);
        }
        // Outside our lock: waits for the requests of the device's queue,
        // reads it.
        let writes_before = tracker
            .bdev()
            .nr_writes(msecs_to_jiffies(DRAIN_MS))
            .inspect_err(|e| {
                pr_warn!(
                    "{}: cannot count the writes before the attach: {:?}\n",
                    tracker.dev(),
                    e
                );
            })
            .ok();
        let proof = fingerprint_of(tracker.bdev())
            .map(|f| f.0)
            .unwrap_or(Proof::None);
        let answer = |restored| Registration {
            restored,
            writes_before: writes_before.unwrap_or(u64::MAX),
            proof,
        };
        // As in `save`.
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        if inner.copies.is_empty() {
            pr_err!(
                "{}: no CBT state device is open to save its state on\n",
                tracker.dev()
            );
            return Err(ENXIO);
        }
        if let Some(c) = inner
            .copies
            .iter()
            .find(|c| overlaps(tracker.bdev(), c.dev.bdev()))
        {
            pr_err!(
                "{}: it shares sectors with the CBT state device {}\n",
                tracker.dev(),
                c.dev.bdev().name()
            );
            return Err(EBUSY);
        }
        let mine = inner
            .registered
            .iter()
            .position(|r| Arc::ptr_eq(&r.tracker, tracker));
        if let Some(other) = inner
            .registered
            .iter()
            .find(|r| r.id == *id && !Arc::ptr_eq(&r.tracker, tracker))
        {
            pr_err!(
                "{}: the CBT state name {} is {}'s already\n",
                tracker.dev(),
                text(name),
                other.tracker.dev()
            );
            return Err(EEXIST);
        }
        let i = match mine {
            Some(i) if inner.registered[i].id == *id => {
                let r = &mut inner.registered[i];
                // A repeat: the same answer. The identity and the risk
                // accepted are those of the last call, for the next save.
                r.identity = *identity;
                r.unverified = unverified;
                return Ok(answer(r.restored));
            }
            Some(i) => {
                let r = &mut inner.registered[i];
                r.id = *id;
                r.restored = 0;
                r.identity = *identity;
                r.unverified = unverified;
                i
            }
            None => {
                inner.registered.push(
                    Registered {
                        id: *id,
                        tracker: tracker.clone(),
                        restored: 0,
                        identity: *identity,
                        unverified,
                        record: None,
                    },
                    GFP_KERNEL,
                )?;
                inner.registered.len() - 1
            }
        };
        let Some(k) = inner.saved.iter().position(|s| s.header.id == *id) else {
            pr_info!(
                "{}: no CBT state saved under {}\n",
                tracker.dev(),
                text(name)
            );
            return Ok(answer(0));
        };
        // Used at most once, restored or not. Restored under the lock, so
        // that a save cannot come between.
        let s = inner.saved.remove(k).ok_or(EINVAL)?;
        let clean = s.clean && inner.opened.copies <= 1;
        let now = Now {
            capacity_sectors: 0,
            block_shift: 0,
            block_count: 0,
            fresh: true,
            writes_before,
            identity,
            start_sector: tracker.bdev().start_sector(),
            // Not recorded: the identity from user space names it.
            partno: 0,
            accept_unverified: unverified,
        };
        let restored = Self::restore(tracker, name, clean, now, s);
        inner.registered[i].restored = restored;
        Ok(answer(restored))
    }

    /// Restores `s` onto `tracker`'s map if it may be; the `restored` of
    /// the UAPI.
    fn restore(tracker: &Tracker, name: &[u8], clean: bool, now: Now<'_>, s: Saved) -> i32 {
        let refuse = |why: Refusal| -> i32 {
            let (errno, text_why) = refusal(why);
            pr_warn!(
                "{}: the CBT state saved under {} is not used: {}\n",
                tracker.dev(),
                text(name),
                text_why
            );
            -(errno as i32)
        };
        // Everything that needs no reading first, with the map's numbers
        // now; the restore checks them again under the map's lock.
        let g = tracker.cbt().geometry();
        let pre = Now {
            capacity_sectors: g.capacity_sectors,
            block_shift: g.block_shift,
            block_count: u64::from(g.block_count),
            fresh: tracker.cbt().is_fresh(),
            ..now
        };
        let verify = match crate::persist_format::check_restore(clean, &s.header, &pre) {
            Ok(v) => v,
            Err(why) => return refuse(why),
        };
        if verify {
            match same_fingerprint(tracker.bdev(), &s.regions, &s.fingerprint) {
                Ok(true) => {}
                Ok(false) => return refuse(Refusal::Fingerprint),
                Err(e) => {
                    pr_warn!(
                        "{}: the CBT state saved under {} is not used: reading its fingerprint failed: {:?}\n",
                        tracker.dev(),
                        text(name),
                        e
                    );
                    return -(kernel::bindings::EIO as i32);
                }
            }
        }
        let proof = Proof::from_u32(s.header.proof);
        match tracker
            .cbt()
            .restore(clean, &s.header, &now, s.active, s.read)
        {
            Ok(()) => {
                pr_info!(
                    "{}: CBT state restored from {}: generation {}, change number {}, proven by {}\n",
                    tracker.dev(),
                    text(name),
                    Uuid(s.header.generation),
                    s.header.active,
                    if verify { proof.name() } else { "nothing (accepted)" }
                );
                1
            }
            Err(why) => refuse(why),
        }
    }

    /// `IOCTL_BLKSNAP_CBT_SAVE`. Returns the devices saved and the bytes
    /// written to each copy.
    pub(crate) fn save(&self, wq: &Queue) -> Result<(u32, u64)> {
        // Once sealed, reclaim that writes to a sealed device would wait
        // for the seal's breaking, which waits for this lock.
        let _noio = NoIoScope::new();
        let later = SpawnLater::new(GFP_KERNEL)?;
        let mut inner = self.inner.lock();
        if inner.copies.is_empty() {
            pr_err!("CBT save: no CBT state device is open\n");
            return Err(ENXIO);
        }
        // A state clean on the devices stops being so before it changes:
        // the records are rewritten under it.
        self.unseal_all(&mut inner);
        if inner.registered.len() > MAX_RECORDS as usize {
            pr_err!(
                "CBT save: {} devices, at most {} fit\n",
                inner.registered.len(),
                MAX_RECORDS
            );
            return Err(ENOSPC);
        }
        // Sealed first: what passed before is in the maps once it drained,
        // what comes after is held until the state is marked broken.
        let mut r = Ok(());
        for reg in inner.registered.iter() {
            r = reg.tracker.seal();
            if r.is_err() {
                pr_err!(
                    "CBT save: a snapshot of {} is being taken; try again\n",
                    reg.tracker.dev()
                );
                break;
            }
        }
        let r = r
            .and_then(|()| {
                for reg in inner.registered.iter() {
                    reg.tracker
                        .drain(msecs_to_jiffies(DRAIN_MS))
                        .inspect_err(|e| {
                            pr_err!(
                                "CBT save: the writes in flight on {} did not complete: {:?}\n",
                                reg.tracker.dev(),
                                e
                            );
                        })?;
                }
                Ok(())
            })
            .and_then(|()| write_state(&mut inner));
        match r {
            Ok(bytes) => {
                for (i, reg) in inner.registered.iter_mut().enumerate() {
                    reg.record = Some(i as u32);
                }
                *self.breaker.lock() = Some(later);
                // A write held while the state was written found no work
                // item to break the seal: it gets one now.
                if inner.registered.iter().any(|r| r.tracker.holds_writes()) {
                    self.break_seal(wq);
                }
                let n = inner.registered.len() as u32;
                pr_info!(
                    "CBT state of {} devices saved on {} device{} ({} bytes, sequence {})\n",
                    n,
                    inner.copies.len(),
                    if inner.copies.len() > 1 { "s" } else { "" },
                    bytes,
                    inner.sequence
                );
                Ok((n, bytes))
            }
            Err(e) => {
                pr_err!("CBT save failed: {:?}\n", e);
                for r in inner.registered.iter_mut() {
                    r.record = None;
                    r.tracker.unseal();
                }
                Err(e)
            }
        }
    }

    /// The write path found a sealed device: the seal breaks in a work
    /// item, which lets the held writes go once the device's record on the
    /// state device is marked broken. Never sleeps.
    pub(crate) fn break_seal(&self, wq: &Queue) {
        if let Some(later) = self.breaker.lock().take() {
            later.spawn(wq, unseal_work as fn());
        }
    }

    /// Marks the record of the `i`th registered device broken on every
    /// copy, then lets its held writes go.
    fn unseal_one(&self, inner: &mut Inner, i: usize) {
        if let Some(record) = inner.registered[i].record.take() {
            let mut written = 0;
            let mut failed = KVec::new();
            for c in inner.copies.iter_mut() {
                set_broken(&mut c.block, record);
                match write_block(c.dev.bdev(), &c.block) {
                    Ok(()) => written += 1,
                    Err(e) => {
                        let _ = failed.push((c.dev.bdev().dev(), e), GFP_NOIO);
                    }
                }
            }
            for (dev, e) in failed.iter() {
                pr_err!(
                    "CBT state device {}: marking the saved state of {} broken failed: {:?}\n",
                    dev,
                    inner.registered[i].tracker.dev(),
                    e
                );
            }
            if written == 0 {
                // Holding the writes for ever would hang the device;
                // failing them would lose data. They go on, and this says
                // that the next boot may restore a map that misses them.
                pr_crit!(
                    "CBT state of {}: its saved state could not be marked broken on any copy: the next boot may restore a map that misses writes from now on; do not trust it (configure a mirror on another device)\n",
                    inner.registered[i].tracker.dev()
                );
            } else if !failed.is_empty() {
                pr_warn!(
                    "CBT state of {}: marked broken on {} copy of 2: the copies disagree, and the next boot restores nothing\n",
                    inner.registered[i].tracker.dev(),
                    written
                );
            }
        }
        inner.registered[i].tracker.unseal();
    }

    /// Breaks every seal.
    fn unseal_all(&self, inner: &mut Inner) {
        for i in 0..inner.registered.len() {
            self.unseal_one(inner, i);
        }
    }

    /// The work item: breaks the seals of the devices that hold writes,
    /// after arming a new work item for the seals met from now on.
    fn unseal_held(&self) {
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        if inner.registered.iter().any(|r| r.record.is_some()) {
            match SpawnLater::new(GFP_KERNEL) {
                Ok(later) => *self.breaker.lock() = Some(later),
                Err(_) => {
                    // No work item for the next seal met: break them all
                    // now, so that no write can be held for ever.
                    pr_warn!("CBT state: out of memory: every seal is broken\n");
                    self.unseal_all(&mut inner);
                    return;
                }
            }
        }
        for i in 0..inner.registered.len() {
            if inner.registered[i].tracker.holds_writes() {
                self.unseal_one(&mut inner, i);
            }
        }
    }

    /// Breaks the seal of `tracker`, synchronously: before a take, a
    /// `CBTDIRTY` or a snapshot image write changes its map. Sleeps.
    pub(crate) fn unseal_tracker(&self, tracker: &Tracker) {
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        match inner
            .registered
            .iter()
            .position(|r| core::ptr::eq(&*r.tracker, tracker))
        {
            Some(i) => self.unseal_one(&mut inner, i),
            None => tracker.unseal(),
        }
    }

    /// The filter is being detached from `tracker`: its state is no longer
    /// saved, and a saved one no longer holds.
    pub(crate) fn forget(&self, tracker: &Arc<Tracker>) {
        // As in `save`.
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        let Some(i) = inner
            .registered
            .iter()
            .position(|r| Arc::ptr_eq(&r.tracker, tracker))
        else {
            return;
        };
        self.unseal_one(&mut inner, i);
        let _ = inner.registered.remove(i);
    }
}

/// The work item of [`Persist::break_seal`].
fn unseal_work() {
    if let Ok(g) = globals() {
        g.persist().unseal_held();
    }
}

/// Writes a header block at the start of `bdev`, durably, after what was
/// written before it.
fn write_block(bdev: &BlockDevice, block: &[u8]) -> Result {
    let len = block_len(bdev, BLOCK_LEN as u64) as usize;
    let mut pages = io::alloc_pages(len)?;
    io::write_slice_to_pages(&mut pages, 0, &block[..BLOCK_LEN])?;
    if len > BLOCK_LEN {
        let zero = KVec::from_elem(0u8, len - BLOCK_LEN, GFP_NOIO)?;
        io::write_slice_to_pages(&mut pages, BLOCK_LEN, &zero)?;
    }
    io::write_pages_durably(bdev, 0, pages, len)?;
    Ok(())
}

/// `len` rounded up to whole logical blocks of `bdev`.
fn block_len(bdev: &BlockDevice, len: u64) -> u64 {
    let lbs = u64::from(bdev.logical_block_size()).max(512);
    len.div_ceil(lbs) * lbs
}

/// Reads `len` bytes at byte `at` of `bdev`, at any alignment: the logical
/// blocks around them are read. `bypass`: past `bdev`'s filter (a tracked
/// device's own data).
fn read_at(bdev: &BlockDevice, at: u64, len: usize, bypass: bool) -> Result<KVVec<u8>> {
    let lbs = u64::from(bdev.logical_block_size()).max(512);
    let start = at - at % lbs;
    let end = (at + len as u64).div_ceil(lbs) * lbs;
    let mut out = KVVec::from_elem(0u8, len, GFP_KERNEL)?;
    let mut pos = start;
    // 1 MiB at a time: the pages of one bio.
    while pos < end {
        let n = (end - pos).min(1 << 20);
        let pages = io::read_pages(bdev, pos >> 9, n as usize, bypass)?;
        io::read_pages_to(&pages, n as usize, |off, b| {
            // The part of [pos + off, +b.len()) inside [at, at + len).
            let from = pos + off as u64;
            let lo = from.max(at);
            let hi = (from + b.len() as u64).min(at + len as u64);
            if lo < hi {
                let dst = (lo - at) as usize..(hi - at) as usize;
                let src = (lo - from) as usize..(hi - from) as usize;
                out[dst].copy_from_slice(&b[src]);
            }
            Ok(())
        })?;
        pos += n;
    }
    Ok(out)
}

/// Reads the first bytes of `bdev` to probe its file system.
fn probe_head(bdev: &BlockDevice) -> Result<KVVec<u8>> {
    let size = bdev.nr_sectors() << 9;
    let len = (fingerprint::PROBE_LEN as u64).min(size) as usize;
    read_at(bdev, 0, len, true)
}

/// What proves `bdev` unwritten: its proof, regions and their bytes.
/// `Proof::None` with no regions if nothing does.
fn fingerprint_of(bdev: &BlockDevice) -> Result<(Proof, KVec<Region>, KVVec<u8>)> {
    let none = || Ok((Proof::None, KVec::new(), KVVec::new()));
    let parts = bdev.partitions()?;
    let mut regions = KVec::new();
    let proof = if parts.is_empty() {
        let head = probe_head(bdev)?;
        let Some((proof, r)) = fingerprint::probe(&head) else {
            return none();
        };
        regions.push(r, GFP_KERNEL)?;
        proof
    } else {
        let mut heads = KVec::with_capacity(parts.len(), GFP_KERNEL)?;
        for p in parts.iter() {
            heads.push((p.start_sector() << 9, probe_head(p)?), GFP_KERNEL)?;
        }
        let mut out = KVec::from_elem(
            Region { offset: 0, len: 0 },
            fingerprint::MAX_REGIONS,
            GFP_KERNEL,
        )?;
        let Some(n) = fingerprint::partitioned(
            bdev.logical_block_size(),
            heads.iter().map(|(s, h)| (*s, &h[..])),
            &mut out,
        ) else {
            return none();
        };
        out.truncate(n);
        regions = out;
        Proof::Partitions
    };
    if !fingerprint::valid(&regions, bdev.nr_sectors() << 9) {
        return none();
    }
    let total: usize = regions.iter().map(|r| r.len as usize).sum();
    let mut bytes = KVVec::with_capacity(total, GFP_KERNEL)?;
    for r in regions.iter() {
        let b = read_at(bdev, r.offset, r.len as usize, true)?;
        bytes.extend_from_slice(&b, GFP_KERNEL)?;
    }
    Ok((proof, regions, bytes))
}

/// Whether the `regions` of `bdev` hold `bytes` now.
fn same_fingerprint(bdev: &BlockDevice, regions: &[Region], bytes: &[u8]) -> Result<bool> {
    if !fingerprint::valid(regions, bdev.nr_sectors() << 9) {
        return Ok(false);
    }
    let mut at = 0usize;
    for r in regions {
        let now = read_at(bdev, r.offset, r.len as usize, true)?;
        let end = at + r.len as usize;
        if bytes.get(at..end) != Some(&now[..]) {
            return Ok(false);
        }
        at = end;
    }
    Ok(at == bytes.len())
}

/// Reads the header block and, with `records`, the saved states of `bdev`.
fn read_state(
    bdev: &BlockDevice,
    records: bool,
) -> core::result::Result<(KVVec<u8>, Header, KVec<Saved>), FormatError> {
    let io_err = |e: Error| {
        pr_err!("CBT state device {}: read failed: {:?}\n", bdev.name(), e);
        FormatError::NoHeader
    };
    let block = read_at(bdev, 0, BLOCK_LEN, false).map_err(io_err)?;
    let header = Header::decode(&block)?;
    let size = bdev.nr_sectors() << 9;
    if header.area_len > AREA_MAX || AREA_OFFSET + header.area_len > size {
        return Err(FormatError::RecordSum);
    }
    let mut saved = KVec::new();
    if header.records == 0 || !records {
        return Ok((block, header, saved));
    }
    let area = read_at(bdev, AREA_OFFSET, header.area_len as usize, false).map_err(io_err)?;
    let copy = |b: &[u8]| -> core::result::Result<KVVec<u8>, FormatError> {
        let mut v =
            KVVec::with_capacity(b.len(), GFP_KERNEL).map_err(|_| FormatError::BadRecord)?;
        v.extend_from_slice(b, GFP_KERNEL)
            .map_err(|_| FormatError::BadRecord)?;
        Ok(v)
    };
    let mut i = 0u32;
    decode_records(&header, &area, |f| {
        let mut regions = KVec::new();
        for e in area[f.regions.clone()].chunks_exact(crate::persist_format::REGION_LEN) {
            regions
                .push(decode_region(e), GFP_KERNEL)
                .map_err(|_| FormatError::BadRecord)?;
        }
        let s = Saved {
            header: f.header,
            clean: header.clean() && !is_broken(&block, i),
            regions,
            fingerprint: copy(&area[f.fingerprint])?,
            active: copy(&area[f.active])?,
            read: copy(&area[f.read])?,
        };
        i += 1;
        saved
            .push(s, GFP_KERNEL)
            .map_err(|_| FormatError::BadRecord)
    })?;
    Ok((block, header, saved))
}

/// Writes the records of the registered devices to every copy, then a
/// clean header block. Returns the bytes written to each copy.
fn write_state(inner: &mut Inner) -> Result<u64> {
    let mut area_len = 0usize;
    let mut records = KVec::new();
    for r in inner.registered.iter() {
        // Sealed and drained: the device does not change while it is read.
        let (proof, regions, bytes) = fingerprint_of(r.tracker.bdev()).unwrap_or_else(|e| {
            pr_warn!(
                "{}: cannot read its fingerprint ({:?}): its state will need the risk accepted\n",
                r.tracker.dev(),
                e
            );
            (Proof::None, KVec::new(), KVVec::new())
        });
        if proof == Proof::None {
            pr_info!(
                "{}: no file system to fingerprint: its saved state is restored only if that risk is accepted\n",
                r.tracker.dev()
            );
        }
        let mut extra = KVVec::new();
        for reg in regions.iter() {
            extra.extend_from_slice(&encode_region(reg), GFP_KERNEL)?;
        }
        extra.extend_from_slice(&bytes, GFP_KERNEL)?;
        let rec = r.tracker.cbt().save_record(
            &r.id,
            |h| {
                h.identity = r.identity;
                h.start_sector = r.tracker.bdev().start_sector();
                h.partno = 0;
                h.flags = if r.unverified { RECORD_UNVERIFIED } else { 0 };
                h.proof = proof as u32;
                h.regions = regions.len() as u32;
                h.fingerprint_len = bytes.len() as u32;
            },
            &extra,
        )?;
        area_len += rec.len();
        records.push(rec, GFP_KERNEL)?;
    }
    let mut sum = FNV_START;
    for rec in records.iter() {
        sum = fnv1a(sum, rec);
    }
    let set = *Uuid::new_random().as_bytes();
    let copies = inner.copies.len() as u32;
    let sequence = inner.sequence + 1;
    for (k, c) in inner.copies.iter_mut().enumerate() {
        let bdev = c.dev.bdev();
        let size = bdev.nr_sectors() << 9;
        if AREA_OFFSET + area_len as u64 > size {
            pr_err!(
                "CBT state device {}: {} bytes of state do not fit its {} bytes\n",
                bdev.name(),
                AREA_OFFSET + area_len as u64,
                size
            );
            return Err(ENOSPC);
        }
        write_area(bdev, &records, area_len)?;
        let header = Header {
            flags: FLAG_CLEAN,
            sequence,
            records: records.len() as u32,
            copies,
            copy: k as u32,
            set,
            area_len: area_len as u64,
            area_sum: sum,
        };
        header.encode(&mut c.block);
    }
    // The headers after every copy's records: a clean header is never on
    // a copy whose records, or whose mirror's, are not there yet.
    for c in inner.copies.iter() {
        write_block(c.dev.bdev(), &c.block)?;
    }
    inner.sequence = sequence;
    Ok(AREA_OFFSET + area_len as u64)
}

/// Writes `records`, `area_len` bytes in all, at the record area of
/// `bdev`, in whole blocks, 1 MiB per write.
fn write_area(bdev: &BlockDevice, records: &[KVVec<u8>], area_len: usize) -> Result {
    let whole = block_len(bdev, area_len as u64) as usize;
    let mut done = 0usize;
    let mut rec_i = 0usize;
    let mut rec_off = 0usize;
    while done < whole {
        let n = (whole - done).min(1 << 20);
        let mut pages = io::alloc_pages(n)?;
        let mut filled = 0usize;
        while filled < n && rec_i < records.len() {
            let rec = &records[rec_i];
            let k = (rec.len() - rec_off).min(n - filled);
            io::write_slice_to_pages(&mut pages, filled, &rec[rec_off..rec_off + k])?;
            filled += k;
            rec_off += k;
            if rec_off == rec.len() {
                rec_i += 1;
                rec_off = 0;
            }
        }
        if filled < n {
            io::write_slice_to_pages(
                &mut pages,
                filled,
                &KVec::from_elem(0u8, n - filled, GFP_KERNEL)?,
            )?;
        }
        io::write_pages(bdev, (AREA_OFFSET + done as u64) >> 9, pages, n, false)?;
        done += n;
    }
    Ok(())
}

/// A name for the log.
fn text(name: &[u8]) -> &str {
    core::str::from_utf8(name).unwrap_or("(not UTF-8)")
}
