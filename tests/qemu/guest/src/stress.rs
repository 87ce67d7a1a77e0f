// SPDX-License-Identifier: GPL-2.0

//! The stress test: for a fixed time (20 s; `BLKSNAP_STRESS_SECONDS`, 600 in
//! `make soak`), on disks c and d, a loop device and the two partitions of
//! disk b at once: writers, snapshots created, filled, taken and destroyed
//! concurrently with every kind of storage (a file that grows in small
//! steps, memory, memory too small that overflows, device ranges appended
//! when the storage runs low), image readers, and attach/detach of the
//! devices that are in no snapshot (detach of one that is must fail with
//! `EBUSY`).
//!
//! The test keeps a shadow of every device: which version of each 4 KiB
//! block each write put where. At the end every sector of every device must
//! be what the shadow says. An image read while its snapshot reports no
//! error must hold, for each block, the version the block had at the take;
//! for a block written while the take ran, either version. Then the module
//! must unload (and is loaded again); the harness checks kmemleak at the end.

use crate::dev::{self, AlignedBuf};
use crate::snap::{disk, e, Rng};
use crate::{fail, TestResult};
use blksnap::{Control, Event, SectorRange, SnapshotId, Tracker};
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

type Test = (&'static str, fn() -> TestResult);

/// The stress tests.
pub const ALL: &[Test] = &[
    (
        "stress_destroy_under_cow_writes_lock_order",
        destroy_under_cow_writes,
    ),
    ("stress_snapshots_writers_readers_attach_detach", stress),
];

const BLOCK: usize = 4096;
/// Writes go to the first 16 MiB of each device (4096 blocks): the
/// snapshots' storages stay small; the rest of each device must not change.
const REGION_BLOCKS: u64 = 4096;
const MIB_SECTORS: u64 = 2048;

/// A 64-bit mix (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The contents of `block` of device `dev` at `version` (>= 1): the first
/// word holds the version and the block number, the rest depends on all
/// three.
fn fill_block(buf: &mut [u8], dev: usize, block: u64, version: u32) {
    let key = mix(((dev as u64) << 56) ^ (block << 24) ^ u64::from(version));
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = if i == 0 {
            (u64::from(version) << 32) | (block & 0xffff_ffff)
        } else {
            key ^ (i as u64)
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// A hash of a block's contents, for the blocks that were never written.
fn hash_block(buf: &[u8]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    for w in buf.chunks(8) {
        h = mix(h ^ u64::from_le_bytes(w.try_into().unwrap()));
    }
    h
}

/// What the test knows of a device's contents.
struct Shadow {
    /// The version of each block of the region written last and completed
    /// (0: the contents before the test).
    committed: Vec<u32>,
    /// The version being written to each block, 0 if none.
    inflight: Vec<u32>,
    /// While a snapshot of the device is taken: the writes that start.
    recording: Option<Vec<(u32, u32)>>,
    next_version: u32,
}

struct StressDev {
    idx: usize,
    path: PathBuf,
    blocks: u64,
    /// Hashes of every block before the test.
    initial: Vec<u64>,
    shadow: Mutex<Shadow>,
}

/// The versions an image may hold: the version at the take, and for the
/// blocks written while the take ran, those too.
struct Expect {
    base: Vec<u32>,
    extra: HashMap<u32, Vec<u32>>,
}

impl Expect {
    fn allows(&self, block: u64, v: u32) -> bool {
        self.base[block as usize] == v
            || self
                .extra
                .get(&(block as u32))
                .is_some_and(|x| x.contains(&v))
    }
}

/// A taken snapshot that readers may read.
struct Live {
    id: SnapshotId,
    /// Device index, image path, expected contents.
    images: Vec<(usize, PathBuf, Expect)>,
    /// Readers open images under the read lock; destroy takes the write
    /// lock first and sets `destroying`: an image name is never opened
    /// after its snapshot started to go (the name may be reused).
    lease: RwLock<bool>,
    /// The storage may overflow: EIO and a corrupted event are expected.
    small: bool,
}

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    blocks_written: AtomicU64,
    creates: AtomicU64,
    adds: AtomicU64,
    takes: AtomicU64,
    take_errors: AtomicU64,
    destroys: AtomicU64,
    attaches: AtomicU64,
    detaches: AtomicU64,
    detach_refused: AtomicU64,
    appends: AtomicU64,
    image_reads: AtomicU64,
    blocks_verified: AtomicU64,
    reads_eio_expected: AtomicU64,
    overflowed: AtomicU64,
    corrupted_events: AtomicU64,
    other_events: AtomicU64,
}

struct State {
    devs: Vec<StressDev>,
    /// Devices in no snapshot and not being detached.
    free: Mutex<Vec<bool>>,
    live: Mutex<Vec<Arc<Live>>>,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    stats: Stats,
    dir: PathBuf,
}

impl State {
    fn fail(&self, msg: String) {
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(msg);
        }
    }

    fn claim(&self, rng: &mut Rng, n: usize) -> Vec<usize> {
        let mut free = self.free.lock().unwrap();
        let mut idx: Vec<usize> = (0..free.len()).filter(|&i| free[i]).collect();
        let mut out = Vec::new();
        while out.len() < n && !idx.is_empty() {
            let i = idx.remove(rng.below(idx.len() as u64) as usize);
            free[i] = false;
            out.push(i);
        }
        out
    }

    fn release(&self, devs: &[usize]) {
        let mut free = self.free.lock().unwrap();
        for &d in devs {
            free[d] = true;
        }
    }
}

/// Reads a whole device and hashes each block.
fn hash_device(dev: &Path) -> Result<Vec<u64>, String> {
    let sectors = dev::size_sectors(dev)?;
    let blocks = sectors * 512 / BLOCK as u64;
    let f = dev::open_direct(dev, false)?;
    let mut out = Vec::with_capacity(blocks as usize);
    let step = 256u64;
    let mut b = 0;
    while b < blocks {
        let n = step.min(blocks - b);
        let mut buf = AlignedBuf::new(n as usize * BLOCK, 0);
        f.read_exact_at(buf.as_mut_slice(), b * BLOCK as u64)
            .map_err(|e| format!("read {} at block {b}: {e}", dev.display()))?;
        out.extend(buf.as_slice().chunks(BLOCK).map(hash_block));
        b += n;
    }
    Ok(out)
}

/// Checks that `got` (blocks from `first`) of device `d` holds versions
/// `want` allows; returns the first wrong blocks.
fn check_blocks(
    d: &StressDev,
    got: &[u8],
    first: u64,
    allows: impl Fn(u64, u32) -> bool,
    version_of: impl Fn(u64) -> Option<u32>,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = vec![0u8; BLOCK];
    for (i, g) in got.chunks(BLOCK).enumerate() {
        let block = first + i as u64;
        if block >= REGION_BLOCKS || version_of(block).is_none() {
            if hash_block(g) != d.initial[block as usize] {
                bad.push(format!("block {block}: not its contents before the test"));
            }
            continue;
        }
        // The version it holds is in its first word.
        let w0 = u64::from_le_bytes(g[..8].try_into().unwrap());
        let v = (w0 >> 32) as u32;
        let ok = (allows(block, 0) && hash_block(g) == d.initial[block as usize])
            || (v != 0 && allows(block, v) && {
                fill_block(&mut want, d.idx, block, v);
                g == want.as_slice()
            });
        if !ok {
            bad.push(format!(
                "block {block}: holds version {v} (or garbage), want {:?}",
                version_of(block)
            ));
        }
        if bad.len() >= 5 {
            break;
        }
    }
    bad
}

fn writer(st: Arc<State>, d: usize, seed: u64) {
    let mut rng = Rng(seed);
    let dev = &st.devs[d];
    let f = match dev::open_direct(&dev.path, true) {
        Ok(f) => f,
        Err(err) => return st.fail(format!("writer: {err}")),
    };
    let mut buf = AlignedBuf::new(16 * BLOCK, 0);
    while !st.stop.load(Ordering::Relaxed) {
        let n = 1 + rng.below(16);
        let start = rng.below(REGION_BLOCKS - n + 1);
        let version = {
            let mut s = dev.shadow.lock().unwrap();
            if (start..start + n).any(|b| s.inflight[b as usize] != 0) {
                continue;
            }
            s.next_version += 1;
            let v = s.next_version;
            for b in start..start + n {
                s.inflight[b as usize] = v;
            }
            if let Some(rec) = s.recording.as_mut() {
                for b in start..start + n {
                    rec.push((b as u32, v));
                }
            }
            v
        };
        for (i, blk) in buf.as_mut_slice()[..n as usize * BLOCK]
            .chunks_mut(BLOCK)
            .enumerate()
        {
            fill_block(blk, d, start + i as u64, version);
        }
        let r = f.write_all_at(&buf.as_slice()[..n as usize * BLOCK], start * BLOCK as u64);
        let mut s = dev.shadow.lock().unwrap();
        for b in start..start + n {
            s.inflight[b as usize] = 0;
            if r.is_ok() {
                s.committed[b as usize] = version;
            }
        }
        drop(s);
        if let Err(err) = r {
            st.fail(format!(
                "an origin write of {n} blocks at block {start} of {} failed: {err}",
                dev.path.display()
            ));
            return;
        }
        st.stats.writes.fetch_add(1, Ordering::Relaxed);
        st.stats.blocks_written.fetch_add(n, Ordering::Relaxed);
        if rng.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(5)));
        }
    }
}

/// Reads images of live snapshots and checks them against the shadow at
/// their take.
fn reader(st: Arc<State>, seed: u64) {
    let mut rng = Rng(seed);
    while !st.stop.load(Ordering::Relaxed) {
        let live = {
            let l = st.live.lock().unwrap();
            if l.is_empty() {
                None
            } else {
                Some(l[rng.below(l.len() as u64) as usize].clone())
            }
        };
        let Some(live) = live else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if live.images.is_empty() {
            continue;
        }
        let (d, image, expect) = &live.images[rng.below(live.images.len() as u64) as usize];
        let dev = &st.devs[*d];
        let f = {
            let destroying = live.lease.read().unwrap();
            if *destroying {
                continue;
            }
            match dev::open_direct(image, false) {
                Ok(f) => f,
                Err(err) => {
                    st.fail(format!("open the image of a live snapshot: {err}"));
                    continue;
                }
            }
        };
        for _ in 0..8 {
            let n = 1 + rng.below(64);
            let first = rng.below(REGION_BLOCKS + 1024 - n);
            let mut buf = AlignedBuf::new(n as usize * BLOCK, 0);
            let r = f.read_exact_at(buf.as_mut_slice(), first * BLOCK as u64);
            let destroying = *live.lease.read().unwrap();
            // The state of the device's snapshot after the read.
            let info = Tracker::open(&dev.path).and_then(|t| t.snapshot_info());
            let reported = match &info {
                Ok(i) => i.error_code,
                Err(_) => 0,
            };
            st.stats.image_reads.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(()) => {
                    let bad = check_blocks(
                        dev,
                        buf.as_slice(),
                        first,
                        |b, v| expect.allows(b, v),
                        |b| Some(expect.base[b as usize]),
                    );
                    if bad.is_empty() {
                        st.stats.blocks_verified.fetch_add(n, Ordering::Relaxed);
                    } else if reported == 0 {
                        st.fail(format!(
                            "image {} of {} ({}) differs from the device at the take, and its snapshot reports no error{}: {}",
                            image.display(),
                            dev.path.display(),
                            live.id,
                            if destroying { " (read raced the destroy)" } else { "" },
                            bad.join("; ")
                        ));
                    }
                }
                Err(err) if err.raw_os_error() == Some(Errno::EIO as i32) => {
                    if reported != 0 || destroying {
                        st.stats.reads_eio_expected.fetch_add(1, Ordering::Relaxed);
                    } else {
                        st.fail(format!(
                            "reading image {} of {} ({}) failed with EIO, but its snapshot reports no error",
                            image.display(),
                            dev.path.display(),
                            live.id
                        ));
                    }
                    break;
                }
                // After a destroy the image's disk is deleted, with a
                // capacity of 0: a read that raced it may end short.
                Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof && destroying => {
                    st.stats.reads_eio_expected.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(err) => {
                    st.fail(format!(
                        "reading image {} of {} ({}){}: {err}",
                        image.display(),
                        dev.path.display(),
                        live.id,
                        if destroying {
                            ", racing its destroy"
                        } else {
                            ""
                        }
                    ));
                    break;
                }
            }
        }
    }
}

/// Detaches and attaches again the devices that are in no snapshot, and
/// checks that a device of a live snapshot cannot be detached.
fn attacher(st: Arc<State>, seed: u64) {
    let mut rng = Rng(seed);
    while !st.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        if rng.below(2) == 0 {
            let claimed = st.claim(&mut rng, 1);
            let Some(&d) = claimed.first() else {
                continue;
            };
            let path = &st.devs[d].path;
            let r = Tracker::open(path).and_then(|t| {
                t.detach()?;
                st.stats.detaches.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(rng.below(100)));
                t.attach()?;
                st.stats.attaches.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            if let Err(err) = r {
                st.fail(format!("detach and attach a device in no snapshot: {err}"));
            }
            st.release(&claimed);
        } else {
            let live = {
                let l = st.live.lock().unwrap();
                if l.is_empty() {
                    continue;
                }
                l[rng.below(l.len() as u64) as usize].clone()
            };
            let guard = live.lease.read().unwrap();
            if *guard || live.images.is_empty() {
                continue;
            }
            let (d, _, _) = &live.images[rng.below(live.images.len() as u64) as usize];
            let r = Tracker::open(&st.devs[*d].path).and_then(|t| t.detach());
            match r {
                Err(err) if err.errno == Errno::EBUSY => {
                    st.stats.detach_refused.fetch_add(1, Ordering::Relaxed);
                }
                other => st.fail(format!(
                    "detach of {}, in live snapshot {}: {other:?}, want EBUSY",
                    st.devs[*d].path.display(),
                    live.id
                )),
            }
            drop(guard);
        }
    }
}

/// The storage kinds of the snapshotters.
#[derive(Clone, Copy, Debug)]
enum Store {
    /// A file on tmpfs that grows in steps of `diff_storage_minimum`.
    File,
    /// Memory enough for everything.
    Memory,
    /// Memory that overflows.
    SmallMemory,
    /// Ranges of a disk, appended when the storage runs low.
    Ranges,
}

/// Creates, fills, takes, holds and destroys snapshots. Snapshotter `n`
/// uses disk `store_disk` for its device ranges.
fn snapshotter(st: Arc<State>, seed: u64, store_disk: PathBuf) {
    let mut rng = Rng(seed);
    let ctl = match Control::open() {
        Ok(c) => c,
        Err(err) => return st.fail(err.to_string()),
    };
    while !st.stop.load(Ordering::Relaxed) {
        let want = 1 + rng.below(3) as usize;
        let devs = st.claim(&mut rng, want);
        if devs.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if let Err(err) = one_snapshot(&st, &ctl, &mut rng, &devs, &store_disk) {
            st.fail(err);
        }
        st.release(&devs);
    }
}

fn one_snapshot(
    st: &Arc<State>,
    ctl: &Control,
    rng: &mut Rng,
    devs: &[usize],
    store_disk: &Path,
) -> TestResult {
    let kind = match rng.below(8) {
        0..=2 => Store::File,
        3..=4 => Store::Memory,
        5 => Store::SmallMemory,
        _ => Store::Ranges,
    };
    let id = match kind {
        Store::File => ctl.snapshot_create(&st.dir, 128 * MIB_SECTORS),
        Store::Memory => ctl.snapshot_create_memory(64 * MIB_SECTORS),
        Store::SmallMemory => ctl.snapshot_create_memory(MIB_SECTORS),
        Store::Ranges => ctl.snapshot_create_devices(),
    }
    .map_err(e)?;
    st.stats.creates.fetch_add(1, Ordering::Relaxed);
    // Destroyed on every way out.
    let snap = crate::snap::Snap {
        id,
        ctl: Control::open().map_err(e)?,
    };
    let mut appended = 0u64;
    if let Store::Ranges = kind {
        // 48 MiB to start with: as much as three devices' writes can need
        // (16 MiB regions), since writers copy a 256 KiB chunk per 4 KiB
        // write, faster than an agent answers an event; low_free_space
        // still comes with 8 MiB left, and 16 MiB more are appended then.
        ctl.snapshot_append_storage(
            &id,
            store_disk,
            &[SectorRange {
                offset: 0,
                count: 48 * MIB_SECTORS,
            }],
        )
        .map_err(e)?;
        appended = 48 * MIB_SECTORS;
        st.stats.appends.fetch_add(1, Ordering::Relaxed);
    }
    for &d in devs {
        let t = Tracker::open(&st.devs[d].path).map_err(e)?;
        // The attacher leaves free devices attached, but one of them may
        // be between its detach and attach: it was claimed then.
        t.snapshot_add(&id).map_err(e)?;
        st.stats.adds.fetch_add(1, Ordering::Relaxed);
    }
    // Sometimes a snapshot is destroyed without being taken.
    if rng.below(10) == 0 {
        snap.destroy()?;
        st.stats.destroys.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    // The take, recording the writes that start while it runs.
    let mut base = Vec::new();
    for &d in devs {
        let mut s = st.devs[d].shadow.lock().unwrap();
        base.push((s.committed.clone(), s.inflight.clone()));
        s.recording = Some(Vec::new());
    }
    let taken = ctl.snapshot_take(&id);
    let mut images = Vec::new();
    for (&d, (committed, inflight)) in devs.iter().zip(base) {
        let rec = st.devs[d]
            .shadow
            .lock()
            .unwrap()
            .recording
            .take()
            .unwrap_or_default();
        let mut extra: HashMap<u32, Vec<u32>> = HashMap::new();
        for (b, v) in inflight.iter().enumerate() {
            if *v != 0 {
                extra.entry(b as u32).or_default().push(*v);
            }
        }
        for (b, v) in rec {
            extra.entry(b).or_default().push(v);
        }
        if taken.is_ok() {
            let t = Tracker::open(&st.devs[d].path).map_err(e)?;
            let info = t.snapshot_info().map_err(e)?;
            if info.image.is_empty() {
                fail!(
                    "snapshot {id}: {} has no image after the take",
                    st.devs[d].path.display()
                );
            }
            let image = PathBuf::from(format!("/dev/{}", info.image));
            for _ in 0..100 {
                if image.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            images.push((
                d,
                image,
                Expect {
                    base: committed,
                    extra,
                },
            ));
        }
    }
    if let Err(err) = taken {
        st.stats.take_errors.fetch_add(1, Ordering::Relaxed);
        fail!("take {id} ({kind:?}): {err}");
    }
    st.stats.takes.fetch_add(1, Ordering::Relaxed);
    let live = Arc::new(Live {
        id,
        images,
        lease: RwLock::new(false),
        small: matches!(kind, Store::SmallMemory),
    });
    st.live.lock().unwrap().push(live.clone());
    let r = hold_and_check(st, ctl, rng, &live, kind, store_disk, appended);
    // No reader opens its images from now on: their names may be reused.
    *live.lease.write().unwrap() = true;
    st.live.lock().unwrap().retain(|l| !Arc::ptr_eq(l, &live));
    let destroyed = snap.destroy();
    st.stats.destroys.fetch_add(1, Ordering::Relaxed);
    r.and(destroyed)
}

/// Holds a taken snapshot for a while: watches its events, gives its
/// device ranges room when it runs low, and checks that every device whose
/// snapshot reports an error got its corrupted event, and that only a
/// small storage overflowed.
fn hold_and_check(
    st: &Arc<State>,
    ctl: &Control,
    rng: &mut Rng,
    live: &Live,
    kind: Store,
    store_disk: &Path,
    mut appended: u64,
) -> TestResult {
    let id = live.id;
    let hold = Instant::now() + Duration::from_millis(500 + rng.below(4000));
    let mut corrupted = Vec::new();
    while Instant::now() < hold && !st.stop.load(Ordering::Relaxed) {
        match ctl.snapshot_wait_event(&id, 200) {
            Ok(Some(Event::LowFreeSpace { .. }))
                if matches!(kind, Store::Ranges) && appended < 96 * MIB_SECTORS =>
            {
                ctl.snapshot_append_storage(
                    &id,
                    store_disk,
                    &[SectorRange {
                        offset: appended,
                        count: 16 * MIB_SECTORS,
                    }],
                )
                .map_err(e)?;
                appended += 16 * MIB_SECTORS;
                st.stats.appends.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Event::Corrupted {
                major,
                minor,
                errno,
            })) => {
                st.stats.corrupted_events.fetch_add(1, Ordering::Relaxed);
                corrupted.push((major, minor, errno));
            }
            Ok(Some(_)) => {
                st.stats.other_events.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(err) => fail!("events of {id}: {err}"),
        }
    }
    // Every device whose snapshot reports an error has its corrupted event
    // (with the positive errno); only a small storage may overflow.
    while let Ok(Some(ev)) = ctl.snapshot_wait_event(&id, 0) {
        if let Event::Corrupted {
            major,
            minor,
            errno,
        } = ev
        {
            st.stats.corrupted_events.fetch_add(1, Ordering::Relaxed);
            corrupted.push((major, minor, errno));
        }
    }
    let mut overflowed = false;
    for (d, _, _) in &live.images {
        let path = &st.devs[*d].path;
        let err = Tracker::open(path)
            .and_then(|t| t.snapshot_info())
            .map_err(e)?
            .error_code;
        if err == 0 {
            continue;
        }
        let (major, minor) = dev::major_minor(path)?;
        if !corrupted.contains(&(major, minor, -err)) {
            fail!(
                "snapshot {id} ({kind:?}): {} reports error {err} but no corrupted event with {} came: {corrupted:?}",
                path.display(),
                -err
            );
        }
        if !live.small || err != -(Errno::ENOSPC as i32) {
            fail!(
                "snapshot {id} ({kind:?}): {} reports error {err}",
                path.display()
            );
        }
        overflowed = true;
    }
    if overflowed {
        st.stats.overflowed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn stress() -> TestResult {
    stress_body()
}

/// Whatever happened, when dropped: no snapshot left, no device attached,
/// so that the tests after this one start clean.
struct Detach(Vec<PathBuf>);

impl Drop for Detach {
    fn drop(&mut self) {
        if let Ok(ctl) = Control::open() {
            for id in ctl.snapshot_collect().unwrap_or_default() {
                let _ = ctl.snapshot_destroy(&id);
            }
        }
        for p in &self.0 {
            if let Ok(t) = Tracker::open(p) {
                let _ = t.detach();
            }
        }
    }
}

fn stress_body() -> TestResult {
    let secs = dev::env_u64("BLKSNAP_STRESS_SECONDS", if dev::soak() { 600 } else { 20 });
    let seed = dev::seed("BLKSNAP_STRESS_SEED", 0x57e5_5eed);
    println!("    {secs} s, seed {seed:#x} (replay: BLKSNAP_STRESS_SEED={seed:#x} BLKSNAP_STRESS_SECONDS={secs})");
    // Files grow in steps of 16 MiB; a ranges store hears low_free_space
    // with 8 MiB (32 chunks) still free, room for the writes that come
    // before its append of 16 MiB lands.
    let _step = dev::ModuleParam::set("diff_storage_minimum", &(16 * MIB_SECTORS).to_string())?;
    let _quiet = dev::QuietConsole::new(4)?;
    let dir = dev::scratch().join("stress");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let b = disk("blksnap-b")?;
    let lo = dev::LoopDev::new("stress-loop", 64 << 20)?;
    let paths = vec![
        disk("blksnap-c")?,
        disk("blksnap-d")?,
        lo.path.clone(),
        dev::partition(&b, 1),
        dev::partition(&b, 2),
    ];
    let mut devs = Vec::new();
    let detach = Detach(paths.clone());
    for (idx, p) in paths.iter().enumerate() {
        let initial = hash_device(p)?;
        let t = Tracker::open(p).map_err(e)?;
        t.attach().map_err(e)?;
        devs.push(StressDev {
            idx,
            path: p.clone(),
            blocks: initial.len() as u64,
            initial,
            shadow: Mutex::new(Shadow {
                committed: vec![0; REGION_BLOCKS as usize],
                inflight: vec![0; REGION_BLOCKS as usize],
                recording: None,
                next_version: 0,
            }),
        });
    }
    let st = Arc::new(State {
        free: Mutex::new(vec![true; devs.len()]),
        devs,
        live: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        stats: Stats::default(),
        dir: dir.clone(),
    });
    let start = Instant::now();
    let mut handles = Vec::new();
    let mut rng = Rng(seed);
    for d in 0..st.devs.len() {
        let (st, s) = (st.clone(), rng.next() | 1);
        handles.push(std::thread::spawn(move || writer(st, d, s)));
    }
    for _ in 0..2 {
        let (st, s) = (st.clone(), rng.next() | 1);
        handles.push(std::thread::spawn(move || reader(st, s)));
    }
    for store in [disk("blksnap-e")?, disk("blksnap-a")?] {
        let (st, s) = (st.clone(), rng.next() | 1);
        handles.push(std::thread::spawn(move || snapshotter(st, s, store)));
    }
    {
        let (st, s) = (st.clone(), rng.next() | 1);
        handles.push(std::thread::spawn(move || attacher(st, s)));
    }
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
        crate::kmsg_poll();
        if !st.failures.lock().unwrap().is_empty() {
            break;
        }
    }
    st.stop.store(true, Ordering::Relaxed);
    let ran = start.elapsed().as_secs_f64();
    // Every thread ends within a minute, or it is stuck in the kernel.
    let wait = Instant::now();
    let mut stuck = 0;
    for h in handles {
        while !h.is_finished() && wait.elapsed() < Duration::from_secs(60) {
            crate::kmsg_poll();
            std::thread::sleep(Duration::from_millis(50));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            stuck += 1;
        }
    }
    let s = &st.stats;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "    {ran:.0} s: {} writes ({} blocks of 4 KiB), {} creates, {} adds, {} takes, {} destroys, {} store appends, {} detaches + {} attaches, {} detaches refused with EBUSY",
        g(&s.writes),
        g(&s.blocks_written),
        g(&s.creates),
        g(&s.adds),
        g(&s.takes),
        g(&s.destroys),
        g(&s.appends),
        g(&s.detaches),
        g(&s.attaches),
        g(&s.detach_refused)
    );
    println!(
        "    {} image reads ({} blocks verified, {} EIO or end of device where expected), {} snapshots overflowed, {} corrupted events, {} other events",
        g(&s.image_reads),
        g(&s.blocks_verified),
        g(&s.reads_eio_expected),
        g(&s.overflowed),
        g(&s.corrupted_events),
        g(&s.other_events)
    );
    let failures = st.failures.lock().unwrap().clone();
    for f in &failures {
        println!("    failure: {f}");
    }
    if stuck != 0 {
        fail!(
            "{stuck} threads still in the kernel a minute after the end (seed {seed:#x}); {}",
            dev::blocked_threads()
        );
    }
    if let Some(f) = failures.first() {
        fail!(
            "{} failures (seed {seed:#x}), the first: {f}",
            failures.len()
        );
    }
    // The snapshotters destroyed theirs: no snapshot is left.
    let ctl = Control::open().map_err(e)?;
    let left = ctl.snapshot_collect().map_err(e)?;
    if !left.is_empty() {
        fail!("{} snapshots left after the stress", left.len());
    }
    drop(ctl);
    // Every device is exactly what the writers wrote.
    for d in &st.devs {
        let f = dev::open_direct(&d.path, false)?;
        let shadow = d.shadow.lock().unwrap();
        let step = 256u64;
        let mut b = 0;
        while b < d.blocks {
            let n = step.min(d.blocks - b);
            let mut buf = AlignedBuf::new(n as usize * BLOCK, 0);
            f.read_exact_at(buf.as_mut_slice(), b * BLOCK as u64)
                .map_err(|e| format!("read {}: {e}", d.path.display()))?;
            let committed = |blk: u64| {
                if blk < REGION_BLOCKS {
                    let v = shadow.committed[blk as usize];
                    (v != 0).then_some(v)
                } else {
                    None
                }
            };
            let bad = check_blocks(
                d,
                buf.as_slice(),
                b,
                |blk, v| committed(blk) == Some(v) || (v == 0 && committed(blk).is_none()),
                committed,
            );
            if !bad.is_empty() {
                fail!(
                    "{} differs from what the writers wrote (seed {seed:#x}): {}",
                    d.path.display(),
                    bad.join("; ")
                );
            }
            b += n;
        }
    }
    println!(
        "    every block of the {} devices is what was written last",
        st.devs.len()
    );
    for d in &st.devs {
        let t = Tracker::open(&d.path).map_err(e)?;
        t.detach().map_err(e)?;
    }
    drop(detach);
    drop(lo);
    let _ = std::fs::remove_dir_all(&dir);
    drop(_step);
    // The module unloads, and is loaded again for the tests after this.
    dev::reload_module("the stress")?;
    Ok(())
}

/// Destroys snapshots whose storage is a whole block device while writers
/// wait in copy-on-write (one copy in the queue at most: every write to a
/// new chunk waits), so that a writer may hold the last reference to the
/// snapshot's difference area. Dropping it closes the storage device, which
/// takes the disk's `open_mutex`: inside the filter's SRCU read section
/// that makes the lock chain blkfilter_mutex -> blkfilter_srcu ->
/// open_mutex, which with `open_mutex -> blkfilter_mutex` (a partition
/// table re-read drops a tracked partition) can deadlock. The test then
/// makes the other two links (a detach, and a re-read of disk b's
/// partition table with a partition attached): lockdep reports the cycle if
/// the first link was made. Every origin write must succeed and the origin
/// must hold what was written last.
fn destroy_under_cow_writes() -> TestResult {
    const WRITERS: u64 = 4;
    const WRITE: u64 = 128;
    const CHUNK: u64 = 512;
    let rounds = dev::env_u64("BLKSNAP_STRESS_ROUNDS", if dev::soak() { 200 } else { 15 });
    let seed = dev::seed("BLKSNAP_STRESS_SEED", 0xde57_5eed);
    println!("    {rounds} rounds, seed {seed:#x} (replay: BLKSNAP_STRESS_SEED={seed:#x})");
    let origin = disk("blksnap-c")?;
    let store = disk("blksnap-e")?;
    let b = disk("blksnap-b")?;
    let sectors = dev::size_sectors(&origin)?;
    let region = sectors / WRITERS;
    crate::snap::write_pattern(&origin, 0, sectors, 1)?;
    let shadow = Arc::new(Mutex::new(vec![1u64; sectors as usize]));
    let _queue = dev::ModuleParam::set("chunk_maximum_in_queue", "1")?;
    let _detach = Detach(vec![origin.clone(), dev::partition(&b, 1)]);
    let t = Tracker::open(&origin).map_err(e)?;
    t.attach().map_err(e)?;
    let ctl = Control::open().map_err(e)?;
    let mut rng = Rng(seed);
    let (mut writes, mut waited_destroys) = (0u64, 0u64);
    let mut busy = 0u64;
    for round in 0..rounds {
        // The storage of the snapshot destroyed before may still be held
        // for a moment (the writers and the queued copies let go of its
        // area after the destroy returned): EBUSY for at most 10 s.
        let wait = Instant::now();
        let id = loop {
            match ctl.snapshot_create(&store, 0) {
                Ok(id) => break id,
                Err(err)
                    if err.errno == Errno::EBUSY && wait.elapsed() < Duration::from_secs(10) =>
                {
                    busy += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) => fail!("round {round}: {err}"),
            }
        };
        t.snapshot_add(&id).map_err(e)?;
        ctl.snapshot_take(&id).map_err(e)?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut hs = Vec::new();
        for w in 0..WRITERS {
            let (stop, done, shadow, origin) =
                (stop.clone(), done.clone(), shadow.clone(), origin.clone());
            let wseed = 2 + round * WRITERS + w;
            hs.push(std::thread::spawn(move || -> TestResult {
                let f = dev::open_direct(&origin, true)?;
                let mut buf = AlignedBuf::new((WRITE * 512) as usize, 0);
                let mut at = w * region;
                while !stop.load(Ordering::Relaxed) && at + WRITE <= (w + 1) * region {
                    crate::snap::pattern(buf.as_mut_slice(), at, wseed & 0xffff);
                    f.write_all_at(buf.as_slice(), at * 512)
                        .map_err(|err| format!("an origin write at sector {at} failed: {err}"))?;
                    let mut sh = shadow.lock().unwrap();
                    for s in at..at + WRITE {
                        sh[s as usize] = wseed & 0xffff;
                    }
                    drop(sh);
                    done.fetch_add(1, Ordering::Relaxed);
                    at += CHUNK;
                }
                Ok(())
            }));
        }
        // Destroy once the writers are busy copying.
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        let before = done.load(Ordering::Relaxed);
        ctl.snapshot_destroy(&id).map_err(e)?;
        if done.load(Ordering::Relaxed) == before {
            waited_destroys += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join()
                .map_err(|_| "a writer panicked".to_string())?
                .map_err(|err| format!("round {round}: {err}"))?;
        }
        writes += done.load(Ordering::Relaxed);
        crate::kmsg_poll();
    }
    println!(
        "    {writes} writes to new chunks, {waited_destroys} of {rounds} destroys while no write completed; the storage device was still busy after the destroy {busy} times (retried every 10 ms)"
    );
    // The other two links of the cycle: a detach (blkfilter_mutex, then an
    // SRCU grace period) and a partition table re-read that drops a tracked
    // partition (open_mutex, then blkfilter_mutex).
    t.detach().map_err(e)?;
    let p1 = dev::partition(&b, 1);
    Tracker::open(&p1).map_err(e)?.attach().map_err(e)?;
    reread_partitions(&b)?;
    match Tracker::open(&p1).and_then(|t| t.cbt_info()) {
        Err(err) if err.errno == Errno::ENOENT => {}
        other => fail!(
            "{} after its disk's partition table was re-read: {other:?}, want ENOENT (detached)",
            p1.display()
        ),
    }
    let want = shadow.lock().unwrap().clone();
    let bad = crate::fuzz::compare(&origin, &want)?;
    if !bad.is_empty() {
        fail!(
            "the origin lost writes: {}",
            crate::fuzz::mismatch(&origin, &bad)
        );
    }
    println!("    every sector of the origin is what was written last");
    Ok(())
}

/// `BLKRRPART` on `disk`, then waits for udev to re-create the partition
/// nodes.
fn reread_partitions(disk: &Path) -> TestResult {
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    let f = std::fs::File::open(disk).map_err(|err| format!("{}: {err}", disk.display()))?;
    // SAFETY: BLKRRPART takes no argument.
    unsafe { blkrrpart(std::os::fd::AsRawFd::as_raw_fd(&f)) }
        .map_err(|err| format!("BLKRRPART {}: {err}", disk.display()))?;
    drop(f);
    dev::udev_settle();
    let p1 = dev::partition(disk, 1);
    for _ in 0..100 {
        if p1.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fail!("{} did not come back after BLKRRPART", p1.display())
}
