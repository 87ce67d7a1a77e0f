// SPDX-License-Identifier: GPL-2.0

//! The tracker: the `blksnap` block device filter, one per attached device.
//!
//! It sees every bio submitted to its device and records the blocks that
//! writes, discards and write-zeroes touch in the device's CBT map. User space
//! reads and edits the map with `BLKFILTER_CTL` commands.

use crate::{
    cbt_map::{CbtMap, Map},
    diff_area::{DiffArea, Verdict},
    params,
    snapshot::Snapshot,
    uapi::{self, ctl},
};
use core::mem::size_of;
use kernel::{
    alloc::{flags::GFP_ATOMIC, flags::GFP_KERNEL, flags::GFP_NOIO, KVec},
    block::{
        bdev::{BlockDevice, DevT},
        bio::{flags, submitter_may_wait, BioList, InFlightBio},
        filter::{Admitted, Filter, Passage},
    },
    c_str,
    error::code::*,
    new_spinlock,
    prelude::*,
    str::CStr,
    sync::{Arc, SpinLock},
    types::{ARef, AsBytes, FromBytes},
    uaccess::{in_compat_syscall, UserSlice},
    uuid::Uuid,
};

// SAFETY: These structures consist of integers; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapCbtmap {}
// SAFETY: As above; the padding after `count` is never interpreted.
unsafe impl FromBytes for uapi::BlksnapCbtdirty {}
// SAFETY: Integers only, packed: no padding, any bit pattern is valid.
unsafe impl FromBytes for uapi::compat::BlksnapCbtdirty {}
// SAFETY: As above.
unsafe impl FromBytes for uapi::BlksnapSectors {}
// SAFETY: As above.
unsafe impl FromBytes for uapi::BlksnapSnapshotadd {}
// SAFETY: An i32 followed by bytes: no padding, any bit pattern is valid.
unsafe impl AsBytes for uapi::BlksnapSnapshotinfo {}
// SAFETY: Eight bytes, then u64s: no padding (48 bytes on every ABI), any
// bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapCbtfine {}
// SAFETY: As above.
unsafe impl AsBytes for uapi::BlksnapCbtfine {}
// SAFETY: Bytes, then a u32 and an i32, then bytes: 88 bytes without
// padding; any bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapCbtpersist {}
// SAFETY: As above.
unsafe impl AsBytes for uapi::BlksnapCbtpersist {}
// SAFETY: 128 bytes, a u64 and two u32s: 144 bytes without padding; any
// bit pattern is valid.
unsafe impl FromBytes for uapi::BlksnapCbtpersistExt {}
// SAFETY: As above.
unsafe impl AsBytes for uapi::BlksnapCbtpersistExt {}

/// Fine blocks one `CBTFINE` call may ask about (16 MiB of answers).
const CBTFINE_MAX: u64 = 1 << 24;

/// The snapshot side of a tracker.
struct Cow {
    /// The snapshot the device was added to.
    snapshot: Option<Uuid>,
    /// Copy-on-write state, once the snapshot is taken.
    area: Option<Arc<DiffArea>>,
    /// Index of the snapshot image.
    image: Option<u32>,
    /// Set while a snapshot is being taken: new writes wait in `held`.
    holding: bool,
    /// Set after the device's CBT state was saved: the first write waits
    /// in `held` until the saved state is marked not clean (see
    /// [`crate::persist`]).
    sealed: bool,
    held: BioList,
    /// The filter was detached: the device is gone or no longer tracked.
    detached: bool,
}

/// A tracked block device.
///
/// Every write that the tracker lets pass is admitted through `passage`
/// first, so that taking a snapshot can wait for the writes that passed
/// before it: a snapshot then holds every write that completed before it,
/// and none that passed after it.
#[pin_data]
pub(crate) struct Tracker {
    dev: DevT,
    bdev: ARef<BlockDevice>,
    #[pin]
    cbt: CbtMap,
    #[pin]
    cow: SpinLock<Cow>,
    /// The writes let pass and not completed yet.
    #[pin]
    passage: Passage,
}

impl Tracker {
    fn new(bdev: &BlockDevice) -> Result<Arc<Self>> {
        let cbt = CbtMap::new(
            bdev.nr_sectors(),
            &params::cbt_params(),
            crate::fine::fine_shift(bdev.logical_block_size()),
        )?;
        let tracker = Arc::pin_init(
            try_pin_init!(Self {
                dev: bdev.dev(),
                bdev: ARef::from(bdev),
                cbt <- cbt,
                cow <- new_spinlock!(Cow {
                    snapshot: None,
                    area: None,
                    image: None,
                    holding: false,
                    sealed: false,
                    held: BioList::new(),
                    detached: false,
                }, "Tracker::cow"),
                passage <- Passage::new(),
            }),
            GFP_KERNEL,
        )?;
        let g = tracker.cbt.geometry();
        pr_info!(
            "tracking {} [{}]: {} sectors, {} blocks of {} bytes\n",
            bdev,
            tracker.dev,
            g.capacity_sectors,
            g.block_count,
            g.block_size()
        );
        Ok(tracker)
    }

    /// Returns the device number of the tracked device.
    pub(crate) fn dev(&self) -> DevT {
        self.dev
    }

    /// Returns the tracked device.
    pub(crate) fn bdev(&self) -> &BlockDevice {
        &self.bdev
    }

    /// Returns a reference to the tracked device.
    pub(crate) fn bdev_ref(&self) -> ARef<BlockDevice> {
        self.bdev.clone()
    }

    /// True once the filter was detached.
    pub(crate) fn is_detached(&self) -> bool {
        self.cow.lock().detached
    }

    /// Makes the device a member of snapshot `id`.
    pub(crate) fn join(&self, id: Uuid) -> Result {
        let mut cow = self.cow.lock();
        if cow.detached {
            return Err(ENODEV);
        }
        match cow.snapshot {
            Some(s) if s == id => {
                pr_err!("{}: already in snapshot {}\n", self.dev, id);
                Err(EALREADY)
            }
            Some(s) => {
                pr_err!(
                    "{}: already in snapshot {}, cannot join {}\n",
                    self.dev,
                    s,
                    id
                );
                Err(EBUSY)
            }
            None => {
                cow.snapshot = Some(id);
                Ok(())
            }
        }
    }

    /// Leaves snapshot `id`: copy-on-write stops. Returns the difference
    /// area if the snapshot was taken.
    pub(crate) fn leave(&self, id: &Uuid) -> Option<Arc<DiffArea>> {
        let area = {
            let mut cow = self.cow.lock();
            if cow.snapshot.as_ref() != Some(id) {
                return None;
            }
            cow.snapshot = None;
            cow.image = None;
            cow.area.take()
        };
        if let Some(a) = &area {
            a.shut_down();
        }
        area
    }

    /// Starts holding new writes, for the instant a snapshot is taken.
    pub(crate) fn hold_writes(&self) {
        self.cow.lock().holding = true;
    }

    /// Waits until the writes that passed before [`Tracker::hold_writes`]
    /// completed, at most `timeout_jiffies`. Sleeps, interruptibly.
    pub(crate) fn drain(&self, timeout_jiffies: kernel::time::Jiffies) -> Result {
        match self.passage.wait_idle(timeout_jiffies) {
            Ok(true) => Ok(()),
            Ok(false) => {
                pr_err!("{}: writes still in flight, timed out\n", self.dev);
                Err(ETIMEDOUT)
            }
            Err(e) => {
                pr_err!(
                    "{}: interrupted while waiting for writes in flight\n",
                    self.dev
                );
                Err(if e == ERESTARTSYS { EINTR } else { e })
            }
        }
    }

    /// Prepares what switching to a new snapshot needs, sleeping: new CBT
    /// maps if the device changed size, the fine map's next interval.
    pub(crate) fn prepare_switch(&self) -> Result<crate::cbt_map::Prepared> {
        self.cbt
            .prepare_take(self.bdev.nr_sectors(), &params::cbt_params())
    }

    /// Switches the CBT maps and starts copy-on-write with `area`, while
    /// writes are held and none is in flight. Fails with `ENODEV` if the
    /// device went away meanwhile; the area is then marked corrupted.
    pub(crate) fn switch_to(
        &self,
        area: &Arc<DiffArea>,
        prepared: crate::cbt_map::Prepared,
    ) -> Result {
        self.cbt.take_snapshot(prepared);
        {
            let mut cow = self.cow.lock();
            if !cow.detached {
                cow.area = Some(area.clone());
                return Ok(());
            }
        }
        pr_err!(
            "{}: the device went away while the snapshot was taken\n",
            self.dev
        );
        area.set_error(ENODEV);
        Err(ENODEV)
    }

    /// The CBT map.
    pub(crate) fn cbt(&self) -> &CbtMap {
        &self.cbt
    }

    /// Seals the device: its CBT state is being saved, and the first write
    /// from now on is held until the saved state is no longer clean.
    /// Fails with `EBUSY` while a snapshot of it is being taken.
    pub(crate) fn seal(&self) -> Result {
        let mut cow = self.cow.lock();
        if cow.holding {
            return Err(EBUSY);
        }
        cow.sealed = true;
        Ok(())
    }

    /// Whether writes are held.
    pub(crate) fn holds_writes(&self) -> bool {
        !self.cow.lock().held.is_empty()
    }

    /// Lifts the seal, of the writes and of the map, and lets the writes
    /// it held pass, unless a take holds them (its release lets them pass
    /// then). Called once the saved state is marked broken.
    pub(crate) fn unseal(&self) {
        self.cbt.unseal();
        self.lift(|cow| cow.sealed = false);
    }

    /// Breaks the seal of the map before it changes otherwise than by a
    /// write: the saved state is marked broken first, synchronously.
    /// Sleeps.
    pub(crate) fn unseal_now(&self) {
        match crate::snapshot::globals() {
            Ok(g) => g.persist().unseal_tracker(self),
            Err(_) => self.unseal(),
        }
    }

    /// Stops holding writes and lets the held ones pass, through
    /// copy-on-write if the snapshot is on, unless a seal holds them (its
    /// breaking lets them pass then). Writes in flight together have no
    /// order, so new writes may pass before the held ones.
    pub(crate) fn release_writes(&self) {
        self.lift(|cow| cow.holding = false);
    }

    /// Lifts one of the two holds with `lift`; the held writes pass once
    /// neither holds them.
    fn lift(&self, lift: impl FnOnce(&mut Cow)) {
        let (held, area) = {
            let mut cow = self.cow.lock();
            lift(&mut cow);
            if cow.holding || cow.sealed {
                return;
            }
            (cow.held.take(), cow.area.clone())
        };
        self.pass_held(held, area);
    }

    /// Lets held writes pass, through copy-on-write if `area` is on.
    fn pass_held(&self, mut held: BioList, area: Option<Arc<DiffArea>>) {
        while let Some(bio) = held.pop() {
            let sector = bio.sector_in(&self.bdev);
            let bio = self.passage.admit(bio);
            self.cbt.mark_write(sector, u64::from(bio.sectors()));
            // No REQ_NOWAIT write is held here (see `write`).
            self.pass(sector, bio, area.as_ref(), false, false);
        }
        if let Some(a) = area {
            put_area(a);
        }
    }

    /// Marks sectors changed in both CBT maps, as if user space had asked
    /// with `CBTDIRTY`: for writes to the snapshot image. Sleeps.
    pub(crate) fn mark_changed(&self, sector: u64, count: u64) {
        if let Ok(blocks) = self.cbt.check_range(sector, count) {
            self.cbt.mark_dirty(&mut [blocks], || self.unseal_now());
        }
    }

    /// Whether the copies of the snapshot on the device lag so far behind
    /// that a writer that may wait would be throttled.
    fn congested(&self) -> bool {
        let Some(area) = self.cow.lock().area.clone() else {
            return false;
        };
        let congested = area.congested();
        put_area(area);
        congested
    }

    /// Records the image index of the device.
    pub(crate) fn set_image(&self, index: u32) {
        self.cow.lock().image = Some(index);
    }

    /// Handles a write bio that reached the device: it is held while a
    /// snapshot is being taken; otherwise it is admitted, marked in the CBT
    /// map, and passes on through copy-on-write if a snapshot is on.
    fn write(&self, sector: u64, bio: InFlightBio) {
        let nowait = bio.has_flags(flags::NOWAIT);
        if nowait && self.congested() {
            // A REQ_NOWAIT write never waits, neither in the submitter nor
            // for a copy queued behind a backlog: it fails with EAGAIN
            // (bio_wouldblock_error), and its submitter retries where it
            // may wait (io_uring from a worker, for instance). It did not
            // happen: no CBT mark.
            bio.end(Err(EAGAIN));
            return;
        }
        let (bio, area) = {
            let mut cow = self.cow.lock();
            if cow.holding || cow.sealed {
                if nowait {
                    // Held writes are resubmitted by the take or the seal's
                    // breaking, where an EAGAIN of the block layer would
                    // reach the program.
                    drop(cow);
                    bio.end(Err(EAGAIN));
                    return;
                }
                cow.held.push(bio);
                let sealed = cow.sealed;
                drop(cow);
                if sealed {
                    crate::snapshot::break_seal();
                }
                return;
            }
            (self.passage.admit(bio), cow.area.clone())
        };
        // Marked after it was admitted: a snapshot taken from now on waits
        // for the write, so the mark belongs to the snapshot it is in.
        self.cbt.mark_write(sector, u64::from(bio.sectors()));
        self.pass(
            sector,
            bio,
            area.as_ref(),
            !nowait && submitter_may_wait(),
            nowait,
        );
        if let Some(a) = area {
            put_area(a);
        }
    }

    /// Lets an admitted write pass, through copy-on-write if `area` is on.
    /// `may_wait`: the caller may sleep while the copies lag behind;
    /// `nowait`: a REQ_NOWAIT write in its submitter's context, which fails
    /// with EAGAIN rather than be held.
    fn pass(
        &self,
        sector: u64,
        bio: Admitted,
        area: Option<&Arc<DiffArea>>,
        may_wait: bool,
        nowait: bool,
    ) {
        let Some(area) = area else {
            bio.submit();
            return;
        };
        if bio.has_crypt_ctx() || bio.has_integrity() {
            pr_err!(
                "{}: inline encryption and integrity data cannot be snapshotted\n",
                self.dev
            );
            area.set_error(EPERM);
            bio.submit();
            return;
        }
        match area.cow(sector, bio, nowait) {
            Verdict::Pass(bio) => bio.submit(),
            Verdict::Held if may_wait => area.throttle(),
            Verdict::Held => {}
            // In the submitter's context: it retries where it may wait.
            Verdict::WouldBlock(bio) => bio.end(Err(EAGAIN)),
        }
    }

    fn cbtinfo(&self, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        // A 32-bit process's structure has no tail padding; the fields are
        // where they are in ours.
        let size = if in_compat_syscall() {
            uapi::compat::CBTINFO_SIZE
        } else {
            size_of::<uapi::BlksnapCbtinfo>()
        };
        check_len(*optlen, size, "CBTINFO")?;
        let info = self.cbt.info();
        let out = uapi::BlksnapCbtinfo {
            device_capacity: info.geometry.capacity_bytes(),
            block_size: info.geometry.block_size(),
            block_count: info.geometry.block_count,
            generation_id: uapi::BlksnapUuid {
                b: info.state.generation,
            },
            changes_number: info.state.previous,
        };
        opt.writer().write_slice(&out.to_ne_bytes()[..size])?;
        *optlen = size as u32;
        Ok(0)
    }

    fn cbtmap(&self, which: Map, opt: UserSlice, optlen: u32) -> Result<i32> {
        check_len(optlen, size_of::<uapi::BlksnapCbtmap>(), "CBTMAP")?;
        let arg: uapi::BlksnapCbtmap = opt.reader().read()?;
        let blocks = self
            .cbt
            .geometry()
            .check_map_read(arg.offset, arg.length)
            .map_err(|_| {
                pr_err!(
                    "{}: CBTMAP of {} bytes at {} is outside the map of {} blocks\n",
                    self.dev,
                    arg.length,
                    arg.offset,
                    self.cbt.geometry().block_count
                );
                ENODATA
            })?;
        let mut out = UserSlice::new(arg.buffer as usize, arg.length as usize).writer();
        self.cbt.read_to_user(which, blocks, &mut out)?;
        // 0 like every command, as upstream (not the length read).
        Ok(0)
    }

    fn cbtfine(&self, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        check_len(*optlen, size_of::<uapi::BlksnapCbtfine>(), "CBTFINE")?;
        let (mut reader, mut writer) = opt.reader_writer();
        let mut arg: uapi::BlksnapCbtfine = reader.read()?;
        if arg.reserved != [0; 6] || arg.count > CBTFINE_MAX {
            pr_err!(
                "{}: CBTFINE of {} blocks (at most {}), reserved bytes {:?} (must be zero)\n",
                self.dev,
                arg.count,
                CBTFINE_MAX,
                arg.reserved
            );
            return Err(EINVAL);
        }
        let (shift, blocks, memory, limit) = self.cbt.fine_info();
        if !arg
            .offset
            .checked_add(arg.count)
            .is_some_and(|end| end <= blocks)
        {
            pr_err!(
                "{}: CBTFINE of {} blocks at {} is outside the {} fine blocks of the device\n",
                self.dev,
                arg.count,
                arg.offset,
                blocks
            );
            return Err(ENODATA);
        }
        if arg.count > 0 {
            let mut out = UserSlice::new(arg.buffer as usize, arg.count as usize).writer();
            self.cbt
                .fine_to_user(arg.since, arg.offset, arg.count, &mut out)?;
        }
        arg.block_shift = (shift + 9) as u8;
        arg.memory = memory as u64;
        arg.memory_limit = limit as u64;
        writer.write(&arg)?;
        *optlen = size_of::<uapi::BlksnapCbtfine>() as u32;
        Ok(0)
    }

    fn cbtpersist(self: &Arc<Self>, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        // The first version of the structure ends at `generation`; the
        // identity and the outputs after it came later: a caller that
        // passes the first version only registers without an identity.
        let v1 = size_of::<uapi::BlksnapCbtpersist>();
        let full = v1 + size_of::<uapi::BlksnapCbtpersistExt>();
        check_len(*optlen, v1, "CBTPERSIST")?;
        let extended = *optlen as usize >= full;
        let (mut reader, mut writer) = opt.reader_writer();
        let mut arg: uapi::BlksnapCbtpersist = reader.read()?;
        let mut ext = if extended {
            reader.read::<uapi::BlksnapCbtpersistExt>()?
        } else {
            uapi::BlksnapCbtpersistExt::default()
        };
        if arg.flags & !uapi::CBTPERSIST_UNVERIFIED != 0 || ext.reserved != 0 {
            pr_err!(
                "{}: CBTPERSIST flags {:#x} (only {:#x} is known), reserved {} (must be 0)\n",
                self.dev,
                arg.flags,
                uapi::CBTPERSIST_UNVERIFIED,
                ext.reserved
            );
            return Err(EINVAL);
        }
        let unverified = arg.flags & uapi::CBTPERSIST_UNVERIFIED != 0;
        let r = crate::snapshot::globals()?.persist().register(
            self,
            &arg.id,
            &ext.identity,
            unverified,
        )?;
        arg.restored = r.restored;
        arg.generation = self.cbt.info().state.generation;
        writer.write(&arg)?;
        if extended {
            ext.writes_before = r.writes_before;
            ext.proof = r.proof as u32;
            writer.write(&ext)?;
        }
        *optlen = if extended { full } else { v1 } as u32;
        Ok(0)
    }

    fn cbtdirty(&self, opt: UserSlice, optlen: u32) -> Result<i32> {
        let arg = if in_compat_syscall() {
            check_len(
                optlen,
                size_of::<uapi::compat::BlksnapCbtdirty>(),
                "CBTDIRTY",
            )?;
            let c: uapi::compat::BlksnapCbtdirty = opt.reader().read()?;
            uapi::BlksnapCbtdirty {
                count: c.count,
                dirty_sectors: c.dirty_sectors,
            }
        } else {
            check_len(optlen, size_of::<uapi::BlksnapCbtdirty>(), "CBTDIRTY")?;
            opt.reader().read::<uapi::BlksnapCbtdirty>()?
        };
        if arg.count == 0 || arg.count > uapi::CBTDIRTY_MAX_COUNT {
            pr_err!(
                "{}: CBTDIRTY count {} is not in 1..={}\n",
                self.dev,
                arg.count,
                uapi::CBTDIRTY_MAX_COUNT
            );
            return Err(if arg.count == 0 { EINVAL } else { E2BIG });
        }
        let len = arg.count as usize * size_of::<uapi::BlksnapSectors>();
        let mut reader = UserSlice::new(arg.dirty_sectors as usize, len).reader();
        let mut ranges = KVec::with_capacity(arg.count as usize, GFP_KERNEL)?;
        // Every range is checked before any is marked. Overlapping ranges
        // cost nothing: `mark_dirty` merges them.
        let geometry = self.cbt.geometry();
        for _ in 0..arg.count {
            let r: uapi::BlksnapSectors = reader.read()?;
            let blocks = geometry.check_range(r.offset, r.count).map_err(|_| {
                pr_err!(
                    "{}: CBTDIRTY range of {} sectors at {} is empty or outside the device\n",
                    self.dev,
                    r.count,
                    r.offset
                );
                EINVAL
            })?;
            ranges.push(blocks, GFP_KERNEL)?;
        }
        self.cbt.mark_dirty(&mut ranges, || self.unseal_now());
        Ok(0)
    }

    fn snapshotadd(self: &Arc<Self>, opt: UserSlice, optlen: u32) -> Result<i32> {
        check_len(optlen, size_of::<uapi::BlksnapSnapshotadd>(), "SNAPSHOTADD")?;
        let arg: uapi::BlksnapSnapshotadd = opt.reader().read()?;
        Snapshot::find(&Uuid(arg.id.b))?.add(self)?;
        Ok(0)
    }

    fn snapshotinfo(&self, opt: UserSlice, optlen: &mut u32) -> Result<i32> {
        let size = size_of::<uapi::BlksnapSnapshotinfo>();
        check_len(*optlen, size, "SNAPSHOTINFO")?;
        let mut info = uapi::BlksnapSnapshotinfo {
            error_code: 0,
            image: [0; uapi::IMAGE_DISK_NAME_LEN],
        };
        {
            let cow = self.cow.lock();
            if let Some(a) = &cow.area {
                info.error_code = a.error();
            }
            if let Some(i) = cow.image {
                let (name, len) = uapi::image_name(i);
                info.image[..len].copy_from_slice(&name[..len]);
            }
        }
        opt.writer().write(&info)?;
        *optlen = size as u32;
        Ok(0)
    }
}

/// Lets go of a reference to a difference area that the write path or a
/// detach holds. If it is the last one (the snapshot was destroyed
/// meanwhile), the area is freed in a worker, not here: freeing it closes
/// the storage, and closing a storage device takes its disk's `open_mutex`.
/// The write path runs inside the filter's SRCU read section, which a
/// detach waits for while it holds `blkfilter_mutex`, and a detach runs
/// under `blkfilter_mutex`; a partition table re-read holds `open_mutex`
/// and takes `blkfilter_mutex` to detach the filters of the partitions it
/// drops: either order closes a deadlock cycle.
fn put_area(area: Arc<DiffArea>) {
    let Some(last) = area.into_unique_or_drop() else {
        return;
    };
    let flags = if submitter_may_wait() {
        GFP_NOIO
    } else {
        GFP_ATOMIC
    };
    crate::snapshot::drop_later(flags, last);
}

fn check_len(optlen: u32, needed: usize, what: &str) -> Result {
    if (optlen as usize) < needed {
        pr_err!(
            "{}: option buffer of {} bytes, {} needed\n",
            what,
            optlen,
            needed
        );
        return Err(EINVAL);
    }
    Ok(())
}

/// The `blksnap` block device filter.
pub(crate) struct TrackerFilter;

#[vtable]
impl Filter for TrackerFilter {
    const NAME: &'static CStr = c_str!("blksnap");
    type Data = Arc<Tracker>;

    fn attach(bdev: &BlockDevice, _opt: UserSlice) -> Result<Arc<Tracker>> {
        Tracker::new(bdev)
    }

    fn may_detach(tracker: &Arc<Tracker>, bdev: &BlockDevice) -> Result {
        let mut cow = tracker.cow.lock();
        if let Some(id) = cow.snapshot {
            drop(cow);
            pr_err!(
                "{} [{}] belongs to snapshot {}: destroy it before detaching\n",
                bdev,
                tracker.dev(),
                id
            );
            return Err(EBUSY);
        }
        // Nothing can join a snapshot from now on: the detach follows.
        cow.detached = true;
        Ok(())
    }

    fn detach(tracker: &Arc<Tracker>, bdev: &BlockDevice) {
        pr_info!("stopped tracking {} [{}]\n", bdev, tracker.dev());
        // Its saved state, if any, stops being clean first.
        if let Ok(g) = crate::snapshot::globals() {
            g.persist().forget(tracker);
        }
        let (area, mut held) = {
            let mut cow = tracker.cow.lock();
            cow.detached = true;
            cow.holding = false;
            (cow.area.take(), cow.held.take())
        };
        // Only a device that went away is detached while in a snapshot: that
        // snapshot cannot be kept consistent, so it is marked corrupted, and
        // the writes it held go on.
        if let Some(a) = area {
            a.set_error(ENODEV);
            a.shut_down();
            put_area(a);
        }
        while let Some(bio) = held.pop() {
            tracker.passage.admit(bio).submit();
        }
    }

    fn ctl(
        tracker: &Arc<Tracker>,
        _bdev: &BlockDevice,
        cmd: u32,
        opt: UserSlice,
        optlen: &mut u32,
    ) -> Result<i32> {
        match cmd {
            ctl::CBTINFO => tracker.cbtinfo(opt, optlen),
            ctl::CBTMAP => tracker.cbtmap(Map::Read, opt, *optlen),
            ctl::CBTMAP_ACTIVE => tracker.cbtmap(Map::Active, opt, *optlen),
            ctl::CBTFINE => tracker.cbtfine(opt, optlen),
            ctl::CBTPERSIST => tracker.cbtpersist(opt, optlen),
            ctl::CBTDIRTY => tracker.cbtdirty(opt, *optlen),
            ctl::SNAPSHOTADD => tracker.snapshotadd(opt, *optlen),
            ctl::SNAPSHOTINFO => tracker.snapshotinfo(opt, optlen),
            _ => {
                pr_err!("{}: unknown filter command {}\n", tracker.dev(), cmd);
                Err(ENOTTY)
            }
        }
    }

    fn submit_bio(tracker: &Arc<Tracker>, sector: u64, bio: InFlightBio) -> Option<InFlightBio> {
        if !bio.is_write() || bio.sectors() == 0 {
            return Some(bio);
        }
        tracker.write(sector, bio);
        None
    }
}
