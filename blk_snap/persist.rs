// SPDX-License-Identifier: GPL-2.0

//! Change tracking that survives a clean reboot: the CBT state device.
//!
//! The state of each tracked device that user space registered
//! (`BLKFILTER_CTL_BLKSNAP_CBTPERSIST`, under a name stable across boots) is
//! written by `IOCTL_BLKSNAP_CBT_SAVE` to a block device of its own, which
//! no registered device overlaps, like dm-era's metadata device (the format
//! is in [`crate::persist_format`]). The save is meant for the very end of
//! shutdown, after file systems are unmounted or read-only. It cannot miss
//! a write, whenever it runs:
//!
//! - the registered devices are sealed before their maps are copied: a
//!   write that passed before is marked in the map already (marks are made
//!   when a write is admitted, not when it completes), and a write after
//!   it is held;
//! - the first write held by a seal, or a detach of a sealed device, makes
//!   a work item mark the saved state not clean on the state device (a
//!   preflush and FUA write of its header) before the write goes on;
//! - opening the state device at boot reads the saved states and marks
//!   them not clean before it returns: a crash or power cut later in that
//!   boot leaves nothing that the next boot could use.
//!
//! A saved state is restored only onto a device that saw no write and no
//! take since it was attached, of the same size and geometry, and at most
//! once. Writes before the attach at boot are beyond any filter: the device
//! must be attached before anything writes to it (the udev rule does).

use crate::{
    diff_storage::Device,
    io,
    persist_format::{
        decode_records, fnv1a, id_bytes, valid_id, FormatError, Header, RecordHeader, Refusal,
        AREA_OFFSET, FLAG_CLEAN, FNV_START, HEADER_LEN, ID_LEN,
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
    page::PAGE_SIZE,
    prelude::*,
    str::CStr,
    sync::{Arc, Mutex, SpinLock},
    task::NoIoScope,
    workqueue::{Queue, SpawnLater},
};

/// The largest record area read back: far more than any device needs (a
/// byte per CBT block and map, at most 2^21 blocks by default).
const AREA_MAX: u64 = 1 << 30;

/// A state saved at the last shutdown, not used yet.
struct Saved {
    header: RecordHeader,
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
}

struct Inner {
    dev: Option<Arc<Device>>,
    /// What opening the device found: records, and whether they were
    /// saved clean (and so may be restored).
    found: (u32, bool),
    saved: KVec<Saved>,
    registered: KVec<Registered>,
    /// The header on the device. While it says clean (after a save), the
    /// registered devices are sealed.
    header: Header,
}

/// The module's CBT state device.
#[pin_data]
pub(crate) struct Persist {
    #[pin]
    inner: Mutex<Inner>,
    /// The work item that breaks the seal, allocated by the save: the
    /// write path that finds a seal cannot allocate.
    #[pin]
    breaker: SpinLock<Option<SpawnLater<fn()>>>,
}

/// Whether two block devices share sectors: the same one, or a disk and
/// one of its partitions.
fn overlaps(a: &BlockDevice, b: &BlockDevice) -> bool {
    a.dev() == b.dev() || a.whole().dev() == b.dev() || b.whole().dev() == a.dev()
}

impl Persist {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            inner <- new_mutex!(Inner {
                dev: None,
                found: (0, false),
                saved: KVec::new(),
                registered: KVec::new(),
                header: Header::default(),
            }, "Persist::inner"),
            breaker <- new_spinlock!(None, "Persist::breaker"),
        })
    }

    /// `IOCTL_BLKSNAP_CBT_STATE_DEVICE`: opens the state device at `path`
    /// and consumes what it holds. Returns the records read and whether
    /// they were saved clean.
    pub(crate) fn open(&self, path: &CStr, format: bool) -> Result<(u32, bool)> {
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
            if let Some(d) = &inner.dev {
                if d.bdev().dev() == devt && !format {
                    return Ok(inner.found);
                }
                pr_err!(
                    "CBT state device {}: {} is the state device already\n",
                    path,
                    d.bdev().name()
                );
                return Err(EBUSY);
            }
        }
        let dev = Arc::new(Device::open(path)?, GFP_KERNEL)?;
        // As in `save`.
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        if inner.dev.is_some() {
            // Another caller opened one meanwhile.
            drop(inner);
            drop(dev);
            return self.open(path, false);
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
        let bdev = dev.bdev();
        let (header, saved) = match read_state(bdev) {
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
                (Header::default(), KVec::new())
            }
        };
        let (header, saved) = if format {
            (Header::default(), KVec::new())
        } else {
            (header, saved)
        };
        let clean = header.clean();
        let records = saved.len() as u32;
        // Consumed: not clean on the device before the states are used.
        let consumed = Header {
            flags: header.flags & !FLAG_CLEAN,
            ..header
        };
        write_header(bdev, &consumed).inspect_err(|e| {
            pr_err!(
                "CBT state device {}: cannot write its header: {:?}\n",
                path,
                e
            );
        })?;
        pr_info!(
            "CBT state device {}: {} saved device states, {}\n",
            bdev.name(),
            records,
            if clean {
                "saved clean"
            } else {
                "not saved clean: none will be restored"
            }
        );
        inner.header = consumed;
        inner.saved = saved;
        inner.found = (records, clean);
        inner.dev = Some(dev);
        Ok(inner.found)
    }

    /// `BLKFILTER_CTL_BLKSNAP_CBTPERSIST`: registers `tracker` under `id`
    /// and restores the state saved under it if it may be. Returns 1, 0 or
    /// a negative errno as `restored` of the UAPI says.
    pub(crate) fn register(&self, tracker: &Arc<Tracker>, id: &[u8; ID_LEN]) -> Result<i32> {
        if !valid_id(id) {
            pr_err!("{}: a CBT state name is 1 to 63 bytes\n", tracker.dev());
            return Err(EINVAL);
        }
        let name = id_bytes(id);
        // As in `save`.
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        let Some(dev) = inner.dev.clone() else {
            pr_err!(
                "{}: no CBT state device is open to save its state on\n",
                tracker.dev()
            );
            return Err(ENXIO);
        };
        if overlaps(tracker.bdev(), dev.bdev()) {
            pr_err!(
                "{}: it shares sectors with the CBT state device {}\n",
                tracker.dev(),
                dev.bdev().name()
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
            Some(i) if inner.registered[i].id == *id => return Ok(inner.registered[i].restored),
            Some(i) => {
                inner.registered[i].id = *id;
                inner.registered[i].restored = 0;
                i
            }
            None => {
                inner.registered.push(
                    Registered {
                        id: *id,
                        tracker: tracker.clone(),
                        restored: 0,
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
            return Ok(0);
        };
        // Used at most once, restored or not. Restored under the lock, so
        // that a save cannot come between.
        let s = inner.saved.remove(k).ok_or(EINVAL)?;
        let clean = inner.found.1;
        let restored = Self::restore(tracker, name, clean, s);
        inner.registered[i].restored = restored;
        Ok(restored)
    }

    /// Restores `s` onto `tracker`'s map if it may be; the `restored` of
    /// the UAPI.
    fn restore(tracker: &Tracker, name: &[u8], clean: bool, s: Saved) -> i32 {
        match tracker.cbt().restore(clean, &s.header, s.active, s.read) {
            Ok(()) => {
                pr_info!(
                    "{}: CBT state restored from {}: generation {}, change number {}\n",
                    tracker.dev(),
                    text(name),
                    kernel::uuid::Uuid(s.header.generation),
                    s.header.active
                );
                1
            }
            Err(why) => {
                // Errno values only, for `restored`: the kernel crate has no
                // `Error` for these two.
                let (errno, why) = match why {
                    Refusal::NotClean => {
                        (kernel::bindings::ESTALE as i32, "it was not saved clean")
                    }
                    Refusal::Changed => (
                        kernel::bindings::EBUSY as i32,
                        "the device was written since it was attached",
                    ),
                    Refusal::Geometry => (
                        kernel::bindings::EMEDIUMTYPE as i32,
                        "the device's size or geometry differs",
                    ),
                };
                pr_warn!(
                    "{}: the CBT state saved under {} is not used: {}\n",
                    tracker.dev(),
                    text(name),
                    why
                );
                -errno
            }
        }
    }

    /// `IOCTL_BLKSNAP_CBT_SAVE`. Returns the devices saved and the bytes
    /// written.
    pub(crate) fn save(&self, wq: &Queue) -> Result<(u32, u64)> {
        // Once sealed, reclaim that writes to a sealed device would wait
        // for the seal's breaking, which waits for this lock.
        let _noio = NoIoScope::new();
        let later = SpawnLater::new(GFP_KERNEL)?;
        let mut inner = self.inner.lock();
        let Some(dev) = inner.dev.clone() else {
            pr_err!("CBT save: no CBT state device is open\n");
            return Err(ENXIO);
        };
        let bdev = dev.bdev();
        // A state clean on the device stops being so before it changes.
        if inner.header.clean() {
            self.unseal(&mut inner, bdev);
        }
        // Sealed first: what passed before is in the maps, what comes after
        // is held until the state is marked not clean again.
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
        let r = r.and_then(|()| write_state(bdev, &inner));
        match r {
            Ok(header) => {
                inner.header = header;
                *self.breaker.lock() = Some(later);
                // A write held while the state was written found no work
                // item to break the seal: it gets one now.
                if inner.registered.iter().any(|r| r.tracker.holds_writes()) {
                    self.break_seal(wq);
                }
                let n = inner.registered.len() as u32;
                let bytes = AREA_OFFSET + header.area_len;
                pr_info!(
                    "CBT state of {} devices saved on {} ({} bytes, sequence {})\n",
                    n,
                    bdev.name(),
                    bytes,
                    header.sequence
                );
                Ok((n, bytes))
            }
            Err(e) => {
                pr_err!("CBT save on {} failed: {:?}\n", bdev.name(), e);
                for r in inner.registered.iter() {
                    r.tracker.unseal();
                }
                Err(e)
            }
        }
    }

    /// The write path found a sealed device: the seal breaks in a work
    /// item, which lets the held writes go once the state on the device is
    /// no longer clean. Never sleeps.
    pub(crate) fn break_seal(&self, wq: &Queue) {
        if let Some(later) = self.breaker.lock().take() {
            later.spawn(wq, unseal_work as fn());
        }
    }

    /// Marks the state on the device not clean, then lets the sealed
    /// devices' held writes go.
    fn unseal(&self, inner: &mut Inner, bdev: &BlockDevice) {
        if !inner.header.clean() {
            return;
        }
        let header = Header {
            flags: inner.header.flags & !FLAG_CLEAN,
            ..inner.header
        };
        if let Err(e) = write_header(bdev, &header) {
            // Holding the writes for ever would hang the devices; failing
            // them would lose data. They go on, and this says that the next
            // boot may restore a map that misses them.
            pr_err!(
                "CBT state device {}: marking the saved state not clean failed ({:?}): \
                 do not trust it at the next boot\n",
                bdev.name(),
                e
            );
        }
        inner.header = header;
        drop(self.breaker.lock().take());
        for r in inner.registered.iter() {
            r.tracker.unseal();
        }
    }

    /// Breaks the seal if there is one: for the work item, and before a
    /// sealed device is detached.
    fn unseal_now(&self) {
        let _noio = NoIoScope::new();
        let mut inner = self.inner.lock();
        if let Some(dev) = inner.dev.clone() {
            self.unseal(&mut inner, dev.bdev());
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
        if let Some(dev) = inner.dev.clone() {
            self.unseal(&mut inner, dev.bdev());
        }
        let _ = inner.registered.remove(i);
    }
}

/// The work item of [`Persist::break_seal`].
fn unseal_work() {
    if let Ok(g) = globals() {
        g.persist().unseal_now();
    }
}

/// Writes `header` in the first block of `bdev`, durably, after what was
/// written before it.
fn write_header(bdev: &BlockDevice, header: &Header) -> Result {
    let len = block_len(bdev, PAGE_SIZE as u64) as usize;
    let mut pages = io::alloc_pages(len)?;
    let mut block = KVec::from_elem(0u8, len, GFP_NOIO)?;
    block[..HEADER_LEN].copy_from_slice(&header.encode());
    io::write_slice_to_pages(&mut pages, 0, &block)?;
    io::write_pages_durably(bdev, 0, pages, len)?;
    Ok(())
}

/// `len` rounded up to whole logical blocks of `bdev`.
fn block_len(bdev: &BlockDevice, len: u64) -> u64 {
    let lbs = u64::from(bdev.logical_block_size()).max(512);
    len.div_ceil(lbs) * lbs
}

/// Reads `len` bytes at byte `at` of `bdev` (whole logical blocks).
fn read_bytes(bdev: &BlockDevice, at: u64, len: u64) -> Result<KVVec<u8>> {
    let whole = block_len(bdev, len);
    let mut out = KVVec::from_elem(0u8, whole as usize, GFP_KERNEL)?;
    let mut done = 0u64;
    // 1 MiB at a time: the pages of one bio.
    while done < whole {
        let n = (whole - done).min(1 << 20);
        let pages = io::read_pages(bdev, (at + done) >> 9, n as usize, false)?;
        io::read_pages_to(&pages, n as usize, |off, b| {
            let s = done as usize + off;
            out[s..s + b.len()].copy_from_slice(b);
            Ok(())
        })?;
        done += n;
    }
    Ok(out)
}

/// Reads the header and the saved states of `bdev`.
fn read_state(bdev: &BlockDevice) -> core::result::Result<(Header, KVec<Saved>), FormatError> {
    let io_err = |e: Error| {
        pr_err!("CBT state device {}: read failed: {:?}\n", bdev.name(), e);
        FormatError::NoHeader
    };
    let first = read_bytes(bdev, 0, PAGE_SIZE as u64).map_err(io_err)?;
    let header = Header::decode(&first)?;
    let size = bdev.nr_sectors() << 9;
    if header.area_len > AREA_MAX || AREA_OFFSET + header.area_len > size {
        return Err(FormatError::RecordSum);
    }
    let mut saved = KVec::new();
    if header.records == 0 {
        return Ok((header, saved));
    }
    let area = read_bytes(bdev, AREA_OFFSET, header.area_len).map_err(io_err)?;
    let copy = |b: &[u8]| -> core::result::Result<KVVec<u8>, FormatError> {
        let mut v =
            KVVec::with_capacity(b.len(), GFP_KERNEL).map_err(|_| FormatError::BadRecord)?;
        v.extend_from_slice(b, GFP_KERNEL)
            .map_err(|_| FormatError::BadRecord)?;
        Ok(v)
    };
    decode_records(&header, &area, |f| {
        let s = Saved {
            header: f.header,
            active: copy(&area[f.active])?,
            read: copy(&area[f.read])?,
        };
        saved
            .push(s, GFP_KERNEL)
            .map_err(|_| FormatError::BadRecord)
    })?;
    Ok((header, saved))
}

/// Writes the records of the registered devices, then a clean header.
fn write_state(bdev: &BlockDevice, inner: &Inner) -> Result<Header> {
    let mut area_len = 0usize;
    let mut records = KVec::new();
    for r in inner.registered.iter() {
        let rec = r.tracker.cbt().save_record(&r.id)?;
        area_len += rec.len();
        records.push(rec, GFP_KERNEL)?;
    }
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
    let mut sum = FNV_START;
    for rec in records.iter() {
        sum = fnv1a(sum, rec);
    }
    // The area in whole blocks, 1 MiB per write.
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
    let header = Header {
        flags: FLAG_CLEAN,
        sequence: inner.header.sequence + 1,
        records: records.len() as u32,
        area_len: area_len as u64,
        area_sum: sum,
    };
    write_header(bdev, &header)?;
    Ok(header)
}

/// A name for the log.
fn text(name: &[u8]) -> &str {
    core::str::from_utf8(name).unwrap_or("(not UTF-8)")
}
